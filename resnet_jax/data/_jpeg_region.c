/* Decoding one region of a JPEG at a DCT scale, with the libjpeg-turbo the system has.
 *
 * What tf.image.decode_and_crop_jpeg does for the Flax and TPU reference pipelines, through libjpeg-turbo's own
 * partial-decompression API (jpeg_crop_scanline, jpeg_skip_scanlines, libjpeg-turbo >= 1.5): rows above the
 * region are entropy-decoded only (no IDCT, upsampling or colour conversion), columns outside it are not
 * transformed, and decoding stops after the region's last row. resnet_jax/data/jpeg.py is the Python side and
 * says when this is used; everything it cannot decode falls back to the whole-image path there.
 *
 * Python API: decode_region(data, scale_denom, left, top, width, height, out) -> None
 *   data: a bytes-like JPEG; scale_denom: 1, 2, 4 or 8 (the DCT scale 1/scale_denom); the region in pixels of
 *   the image decoded at that scale; out: a writable C-contiguous buffer of that whole image as RGBX rows
 *   ((height, width, 4) uint8). Writes the region's pixels into out, the same values a whole decode gives
 *   (same IDCT, fancy upsampling), and nothing else. Raises ValueError for anything libjpeg reports, warnings
 *   included (as simplejpeg's strict mode: a corrupt region), and for a colour space other than YCbCr, grey or
 *   RGB, a region outside the image or an out of the wrong size. The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#if !defined(JCS_EXTENSIONS) || !defined(JCS_ALPHA_EXTENSIONS)
#error "libjpeg-turbo >= 1.5 is required (RGBX output, jpeg_crop_scanline, jpeg_skip_scanlines)"
#endif

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void error_exit(j_common_ptr cinfo) {
  ErrorManager *errors = (ErrorManager *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, errors->message);
  longjmp(errors->jump, 1);
}

/* A warning (msg_level -1: corrupt or truncated data that libjpeg would paper over) ends the decode like an
 * error; trace messages (msg_level >= 0) are ignored. */
static void emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0) error_exit(cinfo);
}

/* Columns next to a cropped region's left and right edges that libjpeg's fancy upsampling fills from the edge
 * rather than from the neighbouring pixels (measured: up to 2 on the left, 1 on the right, of 4:2:0 and 4:2:2
 * images). The region decoded is widened by this many columns each side and only the requested columns are
 * copied out, so they are the whole-image decode's pixels exactly. */
#define EDGE_COLUMNS 4

static PyObject *decode_region(PyObject *self, PyObject *args) {
  (void)self;
  Py_buffer data, out;
  int scale_denom;
  unsigned int left, top, width, height;
  if (!PyArg_ParseTuple(args, "y*iIIIIw*", &data, &scale_denom, &left, &top, &width, &height, &out))
    return NULL;
  const char *problem = NULL;
  if (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8)
    problem = "scale_denom must be 1, 2, 4 or 8";
  else if (width == 0 || height == 0)
    problem = "the region is empty";
  else if (!PyBuffer_IsContiguous(&out, 'C'))
    problem = "out must be C-contiguous";
  if (problem != NULL) {
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return PyErr_Format(PyExc_ValueError, "decode_region: %s", problem);
  }

  struct jpeg_decompress_struct cinfo;
  ErrorManager errors;
  memset(&cinfo, 0, sizeof(cinfo));
  cinfo.err = jpeg_std_error(&errors.pub);
  errors.pub.error_exit = error_exit;
  errors.pub.emit_message = emit_message;
  errors.message[0] = '\0';
  /* Changed between setjmp and a possible longjmp, read after it: volatile. */
  unsigned char *volatile row = NULL;
  const char *volatile failure = NULL;
  volatile int jpeg_error = 0;

  Py_BEGIN_ALLOW_THREADS;
  if (setjmp(errors.jump)) {
    jpeg_error = 1;
  } else {
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
        cinfo.jpeg_color_space != JCS_RGB) {
      failure = "colour space not decoded here (CMYK, YCCK or unknown)";
    } else {
      cinfo.out_color_space = JCS_EXT_RGBX;
      cinfo.scale_num = 1;
      cinfo.scale_denom = (unsigned int)scale_denom;
      cinfo.dct_method = JDCT_ISLOW; /* as simplejpeg and Pillow decode: the same pixels */
      cinfo.do_fancy_upsampling = TRUE;
      jpeg_start_decompress(&cinfo);
      const JDIMENSION image_width = cinfo.output_width, image_height = cinfo.output_height;
      if ((size_t)out.len != (size_t)image_width * image_height * 4) {
        failure = "out is not (height, width, 4) bytes of the image at this scale";
      } else if ((size_t)left + width > image_width || (size_t)top + height > image_height) {
        failure = "the region is outside the image at this scale";
      } else {
        JDIMENSION x = left > EDGE_COLUMNS ? left - EDGE_COLUMNS : 0;
        JDIMENSION right = left + width + EDGE_COLUMNS < image_width ? left + width + EDGE_COLUMNS
                                                                      : image_width;
        JDIMENSION decoded_width = right - x;
        if (decoded_width < image_width) jpeg_crop_scanline(&cinfo, &x, &decoded_width);
        row = (unsigned char *)malloc((size_t)decoded_width * 4);
        if (row == NULL) {
          failure = "out of memory";
        } else if (top > 0 && jpeg_skip_scanlines(&cinfo, top) != top) {
          failure = "could not skip to the region's first row";
        } else {
          unsigned char *target = (unsigned char *)out.buf + ((size_t)top * image_width + left) * 4;
          const unsigned char *source = row + (size_t)(left - x) * 4;
          while (cinfo.output_scanline < top + height) {
            JSAMPROW rows[1] = {row};
            jpeg_read_scanlines(&cinfo, rows, 1);
            memcpy(target, source, (size_t)width * 4);
            target += (size_t)image_width * 4;
          }
        }
      }
    }
  }
  Py_END_ALLOW_THREADS;
  free(row);
  jpeg_destroy_decompress(&cinfo); /* also aborts: rows below the region are never decoded */
  PyBuffer_Release(&data);
  PyBuffer_Release(&out);
  if (jpeg_error) return PyErr_Format(PyExc_ValueError, "JPEG decode failed: %s", errors.message);
  if (failure != NULL) return PyErr_Format(PyExc_ValueError, "decode_region: %s", failure);
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, scale_denom, left, top, width, height, out) -> None\n\n"
     "Decodes one region of a JPEG at DCT scale 1/scale_denom into out, a writable (height, width, 4)\n"
     "RGBX buffer of the whole image at that scale, with libjpeg-turbo's partial decompression; the rest of\n"
     "out is left as it was."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg_region",
    "Region-of-interest JPEG decoding with the system's libjpeg-turbo (see _jpeg_region.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jpeg_region(void) {
  PyObject *m = PyModule_Create(&module);
  if (m != NULL) PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER", LIBJPEG_TURBO_VERSION_NUMBER);
  return m;
}
