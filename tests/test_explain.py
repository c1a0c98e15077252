import numpy as np
import torch

from cnnpipe import engine, explain, networks
from cnnpipe.sources import load_source

NORM = engine.Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_gradcam_maps_are_normalised_images_that_follow_the_input():
    loaded = load_source("builtin:digits", 16)
    torch.manual_seed(0)
    model = networks.build("small_cnn", num_classes=10, image_size=16)
    images = loaded.images[:4]
    heat = explain.gradcam(model, images, loaded.labels[:4], NORM)
    assert heat.shape == (4, 16, 16)
    assert heat.min() >= 0 and np.allclose(heat.reshape(4, -1).max(1), 1)
    assert not np.array_equal(heat[0], heat[1])  # depends on the image


def test_gradcam_explains_both_classes_of_a_sigmoid_model():
    model = networks.build("seed_cnn", num_classes=2, image_size=16)
    images = load_source("builtin:faces", 16).images[:2]
    for target in (0, 1):
        heat = explain.gradcam(model, images, np.array([target, target]), NORM)
        assert heat.shape == (2, 16, 16) and np.isfinite(heat).all()
    assert explain.last_conv(model) is model[0]


def test_gradcam_memory_does_not_grow_with_the_images_and_each_map_is_as_alone():
    """Three times `GRADCAM_BATCH` images take about the memory of `GRADCAM_BATCH` (a transfer
    model at 512 px takes about 400 MiB an image; evaluate.gradcam_images allows 64), and each
    image gets the map it gets alone."""
    loaded = load_source("builtin:digits", 16)
    torch.manual_seed(0)
    model = networks.build("small_cnn", num_classes=10, image_size=16)
    count = 3 * explain.GRADCAM_BATCH
    images, targets = loaded.images[:count], loaded.labels[:count]
    with engine.PeakMemory() as few:
        explain.gradcam(
            model, images[: explain.GRADCAM_BATCH], targets[: explain.GRADCAM_BATCH], NORM
        )
    with engine.PeakMemory() as many:
        heat = explain.gradcam(model, images, targets, NORM)
    assert many.peak < 1.5 * few.peak, (many.peak, few.peak)
    for i in (0, explain.GRADCAM_BATCH, count - 1):
        alone = explain.gradcam(model, images[i : i + 1], targets[i : i + 1], NORM)
        np.testing.assert_allclose(heat[i], alone[0], atol=1e-5)
