"""TrivialAugment, RandAugment and random erasing: each op's effect, torchvision parity, the sampling, seeds."""

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import augment

torchvision = pytest.importorskip("torchvision")
from torchvision.transforms import InterpolationMode, autoaugment  # noqa: E402

OPS = list(augment.trivial_augment_wide_ops())


def random_image(height=17, width=23, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_op_tables_equal_torchvisions_augmentation_spaces():
    tables = [
        (
            augment.trivial_augment_wide_ops(),
            autoaugment.TrivialAugmentWide()._augmentation_space(31),
        ),
        (
            augment.rand_augment_ops(40, 60),
            autoaugment.RandAugment()._augmentation_space(31, (40, 60)),
        ),
    ]
    for ours, theirs in tables:
        assert list(ours) == list(theirs)  # same order: the op index draws into it
        for name, (magnitudes, signed) in theirs.items():
            assert ours[name][1] == signed, name
            np.testing.assert_allclose(ours[name][0], magnitudes.numpy(), rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("name", OPS)
def test_each_op_equals_torchvisions_pil_op_pixel_for_pixel(name, interpolation):
    image = random_image()
    magnitudes, signed = augment.trivial_augment_wide_ops()[name]
    values = [float(v) for v in magnitudes.reshape(-1)[::6]]
    values += [-v for v in values if signed]
    mode = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR}
    for value in values:
        expected = autoaugment._apply_op(
            Image.fromarray(image), name, value, interpolation=mode[interpolation], fill=None
        )
        actual = augment.apply_op(image, name, value, interpolation)
        np.testing.assert_array_equal(actual, np.asarray(expected), err_msg=f"{name} {value}")


@pytest.mark.parametrize(
    "name, magnitude",
    [
        ("Identity", 0.0),
        ("ShearX", 0.0),
        ("ShearY", 0.0),
        ("TranslateX", 0.0),
        ("TranslateY", 0.0),
        ("Rotate", 0.0),
        ("Brightness", 0.0),
        ("Color", 0.0),
        ("Contrast", 0.0),
        ("Sharpness", 0.0),
        ("Posterize", 8.0),
        ("Solarize", 255.0),  # pixels >= 255 invert; the image has none
    ],
)
def test_ops_at_their_neutral_magnitude_are_the_identity(name, magnitude):
    image = np.minimum(random_image(), 254).astype(np.uint8)
    np.testing.assert_array_equal(augment.apply_op(image, name, magnitude), image)


def test_rotate_by_90_turns_a_square_pattern_counter_clockwise():
    image = random_image(12, 12)
    np.testing.assert_array_equal(augment.apply_op(image, "Rotate", 90.0), np.rot90(image))
    np.testing.assert_array_equal(augment.apply_op(image, "Rotate", -90.0), np.rot90(image, -1))


def test_translate_moves_pixels_and_fills_the_uncovered_band_with_zeros():
    image = random_image(10, 16)
    right = augment.apply_op(image, "TranslateX", 5.9)  # int(5.9) = 5 pixels to the right
    np.testing.assert_array_equal(right[:, 5:], image[:, :-5])
    assert not right[:, :5].any()
    up = augment.apply_op(image, "TranslateY", -3.0)
    np.testing.assert_array_equal(up[:-3], image[3:])
    assert not up[-3:].any()


def test_shear_x_shifts_each_row_by_magnitude_times_its_index():
    image = random_image(8, 40)
    sheared = augment.apply_op(image, "ShearX", 0.5)  # output (x, y) reads input (x + 0.5 y, y)
    for y in range(8):
        shift = int(np.floor(0.5 * y + 0.5))  # nearest sample of a pixel centre
        np.testing.assert_array_equal(sheared[y, : 40 - shift - 1], image[y, shift : 40 - 1])


def test_posterize_solarize_and_autocontrast_compute_their_lookup_tables():
    image = random_image()
    np.testing.assert_array_equal(augment.apply_op(image, "Posterize", 4.0), image & 0xF0)
    solarized = augment.apply_op(image, "Solarize", 128.0)
    np.testing.assert_array_equal(solarized, np.where(image >= 128, 255 - image, image))
    low_contrast = (image // 4 + 100).astype(np.uint8)
    stretched = augment.apply_op(low_contrast, "AutoContrast", 0.0)
    assert stretched.min(axis=(0, 1)).tolist() == [0, 0, 0]
    assert stretched.max(axis=(0, 1)).min() >= 254  # PIL's lookup table truncates the top value
    darker = augment.apply_op(image, "Brightness", -0.5)
    np.testing.assert_allclose(darker, image * 0.5, atol=1.0)


def test_trivial_augment_samples_every_op_bin_and_sign_uniformly():
    rng = np.random.default_rng(0)
    table = augment.trivial_augment_wide_ops()
    draws = [augment.sample_trivial_augment(rng) for _ in range(4000)]
    names = [name for name, _ in draws]
    counts = np.array([names.count(op) for op in OPS])
    assert counts.min() > 4000 / len(OPS) * 0.75  # each op about 1/14 of the time
    for name, magnitude in draws:
        magnitudes, signed = table[name]
        assert np.isclose(np.abs(magnitudes), abs(magnitude)).any(), (name, magnitude)
        assert signed or magnitude >= 0
    shears = {round(m, 4) for n, m in draws if n == "ShearX"}
    assert min(shears) < 0 < max(shears) and len(shears) > 40  # both signs, most of the 31 bins


def test_rand_augment_draws_num_ops_at_the_fixed_magnitude_bin():
    rng = np.random.default_rng(0)
    table = augment.rand_augment_ops(32, 32)
    for _ in range(200):
        draws = augment.sample_rand_augment(rng, 32, 32, num_ops=2, magnitude=9)
        assert len(draws) == 2
        for name, magnitude in draws:
            magnitudes, _ = table[name]
            expected = float(magnitudes[9]) if magnitudes.ndim else 0.0
            assert abs(magnitude) == pytest.approx(abs(expected))
    with pytest.raises(ValueError, match="magnitude"):
        augment.sample_rand_augment(rng, 32, 32, magnitude=31)


def test_augmentations_are_a_function_of_the_generator_seed():
    image = random_image(24, 24)
    for policy in (augment.trivial_augment_wide, augment.rand_augment):
        first = [policy(image, np.random.default_rng(seed)) for seed in range(6)]
        again = [policy(image, np.random.default_rng(seed)) for seed in range(6)]
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)
        assert len({a.tobytes() for a in first}) > 1
    erased = [augment.random_erasing(image, np.random.default_rng(3), p=1.0) for _ in range(2)]
    np.testing.assert_array_equal(*erased)


def test_random_erasing_fills_one_box_of_the_drawn_area_fraction_and_nothing_else():
    height, width = 64, 48
    image = np.full((height, width, 3), 200, np.uint8)
    scale, ratio = augment.ERASING_SCALE, augment.ERASING_RATIO
    for seed in range(50):
        erased = augment.random_erasing(image, np.random.default_rng(seed), p=1.0, value=(1, 2, 3))
        changed = np.any(erased != image, axis=-1)
        ys, xs = np.nonzero(changed)
        box_height, box_width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert changed.sum() == box_height * box_width  # a filled rectangle ...
        np.testing.assert_array_equal(erased[changed], np.tile([1, 2, 3], (changed.sum(), 1)))
        # ... whose sides are those of area in [scale] and height/width in [ratio], rounded to pixels.
        area = height * width
        assert (np.sqrt(scale[0] * area) - 1) ** 2 <= box_height * box_width
        assert box_height * box_width <= (np.sqrt(scale[1] * area) + 1) ** 2
        assert (box_height - 0.5) / (box_width + 0.5) <= ratio[1]
        assert (box_height + 0.5) / (box_width - 0.5) >= ratio[0]
    assert augment.random_erasing(image, np.random.default_rng(0), p=1.0) is not image
    np.testing.assert_array_equal(image, 200)  # the input is never modified


def test_random_erasing_probability_and_mean_value():
    image = random_image(32, 32)
    rng = np.random.default_rng(0)
    erased = [augment.random_erasing(image, rng, p=0.1) is not image for _ in range(2000)]
    assert 0.07 < np.mean(erased) < 0.13
    assert augment.erasing_value((0.485, 0.456, 0.406)) == (124, 116, 104)


def test_erasing_a_normalized_float_image_to_zero_is_erasing_the_uint8_image_to_the_mean():
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    image = random_image(32, 32)
    erased_uint8 = augment.random_erasing(
        image, np.random.default_rng(1), p=1.0, value=augment.erasing_value(mean)
    )
    normalized = ((image / 255.0 - mean) / std).astype(np.float32)
    erased_float = augment.random_erasing(normalized, np.random.default_rng(1), p=1.0, value=0)
    assert erased_float.dtype == np.float32
    # Same box; inside it the uint8 route is off by the rounding of the mean (< 0.5 / 255 / std).
    np.testing.assert_allclose(
        (erased_uint8 / 255.0 - mean) / std, erased_float, atol=0.5 / 255 / 0.224
    )
    assert np.any(erased_float == 0.0)


def test_auto_augment_dispatches_to_the_named_policy():
    image = random_image(24, 24)
    for policy, direct in (
        ("trivial_augment", augment.trivial_augment_wide),
        ("rand_augment", augment.rand_augment),
    ):
        for seed in range(3):
            np.testing.assert_array_equal(
                augment.auto_augment(image, np.random.default_rng(seed), policy),
                direct(image, np.random.default_rng(seed)),
            )
    rng = np.random.default_rng(0)
    assert augment.auto_augment(image, rng, "none") is image
    assert rng.random() == np.random.default_rng(0).random()  # "none" draws nothing
    with pytest.raises(ValueError, match="policy"):
        augment.auto_augment(image, rng, "autoaugment")
