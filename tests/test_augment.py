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


def test_zero_probabilities_leave_a_document_unchanged():
    params = policy_params(policy="document", rotate_p=0, shift_scale_p=0, brightness_contrast_p=0)
    np.testing.assert_array_equal(augmented_copies(IMAGES, build_policy(params, 1), 1), IMAGES)


def test_every_probability_and_limit_comes_from_params():
    params = policy_params(rotate_limit=33, rotate_p=0.25, brightness_limit=0.3, contrast_limit=0.1)
    policy = str(build_policy(params, 0).to_dict())
    for value in ("33", "0.25", "0.3", "0.1"):
        assert value in policy


def flips_of(policy_name: str, source: str = "") -> set[str]:
    policy = build_policy(policy_params(policy=policy_name), 0, source)
    return {t.__class__.__name__ for t in policy.transforms} & {
        "HorizontalFlip",
        "VerticalFlip",
        "RandomRotate90",
    }


def test_each_policy_flips_only_where_the_label_survives_it():
    assert flips_of("document") == set()
    assert flips_of("photo") == {"HorizontalFlip"}
    assert flips_of("texture") == {"HorizontalFlip", "VerticalFlip", "RandomRotate90"}
    assert flips_of("auto", "builtin:digits") == set()  # a mirrored 2 is no digit
    assert flips_of("auto", "folder:data/raw") == {"HorizontalFlip"}


def dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The image's 8 flips and quarter turns; the first two: itself and its mirror image."""
    turns = [np.rot90(image, k) for k in range(4)]
    return [image, image[:, ::-1]] + turns[1:] + [t[:, ::-1] for t in turns[1:]] + [image[::-1]]


def test_a_texture_policy_turns_images_a_photo_policy_keeps_upright():
    """Only shapes change (no shift, rotation or brightness): every view is a flip or a turn;
    upside down or turned only under the texture policy."""
    still = dict(rotate_p=0, shift_scale_p=0, brightness_contrast_p=0)
    for name, turned in (("photo", False), ("texture", True)):
        params = policy_params(policy=name, **still)
        copies = augmented_copies(IMAGES, build_policy(params, 2), 3)
        kinds = set()
        for copy, image in zip(copies, np.tile(IMAGES, (3, 1, 1, 1)), strict=True):
            matches = [k for k, view in enumerate(dihedral(image)) if np.array_equal(copy, view)]
            assert matches, name
            kinds.add(min(matches))
        assert (max(kinds) > 1) == turned, name
