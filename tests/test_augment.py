import numpy as np

from cnnpipe.params import load_params
from cnnpipe.sources import load_source
from cnnpipe.stages.augment import augmented_copies, build_policy
from conftest import REPO

IMAGES = load_source("builtin:digits", 16).images[:20]
REPO_AUGMENT = load_params(REPO / "params.yaml").augment


def policy_params(**changes):
    return REPO_AUGMENT.model_copy(update=changes)


def test_same_seed_same_copies_other_seed_other_copies():
    params = policy_params(rotate_p=1.0, shift_scale_p=1.0)
    first = augmented_copies(IMAGES, build_policy(params, 7), copies=2)
    again = augmented_copies(IMAGES, build_policy(params, 7), copies=2)
    other = augmented_copies(IMAGES, build_policy(params, 8), copies=2)
    assert first.shape == (40, 16, 16, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first[:20], IMAGES)


def test_zero_probabilities_leave_images_unchanged():
    params = policy_params(rotate_p=0, hflip_p=0, shift_scale_p=0, brightness_contrast_p=0)
    np.testing.assert_array_equal(augmented_copies(IMAGES, build_policy(params, 1), 1), IMAGES)


def test_every_probability_and_limit_comes_from_params():
    params = policy_params(rotate_limit=33, hflip_p=0.25, brightness_limit=0.3, contrast_limit=0.1)
    policy = str(build_policy(params, 0).to_dict())
    for value in ("33", "0.25", "0.3", "0.1"):
        assert value in policy
