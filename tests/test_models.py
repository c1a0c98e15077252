import numpy as np
import pytest
import torch
from skimage import data
from torch import nn

from cnnpipe import models, networks
from cnnpipe.errors import UserError


def test_seed_cnn_is_the_source_documents_network():
    net = networks.build("seed_cnn", num_classes=2, image_size=64)
    kinds = [type(layer) for layer in net]
    flatten = networks.FlattenHWC
    assert kinds == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, flatten, nn.Linear, nn.ReLU, nn.Linear]
    conv, pool, dense, output = net[0], net[1], net[4], net[6]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 32, (3, 3))
    assert pool.kernel_size == 2
    assert (dense.in_features, dense.out_features) == (32 * 31 * 31, 128)
    assert output.out_features == 1  # one sigmoid unit for two classes, as in the source


def test_seed_cnn_pooling_before_relu_is_the_sources_conv_relu_pool():
    torch.manual_seed(0)
    net = networks.build("seed_cnn", num_classes=10, image_size=32)
    conv, pool = net[0], net[1]
    images = torch.randn(8, 3, 32, 32)
    as_written = pool(torch.relu(conv(images)))  # Conv2D(activation="relu"), MaxPooling2D
    torch.testing.assert_close(net[:3](images), as_written, rtol=0, atol=0)


def test_seed_cnn_flattens_like_keras_without_copying_a_channels_last_map():
    features = torch.randn(2, 32, 5, 5).contiguous(memory_format=torch.channels_last)
    flat = networks.FlattenHWC()(features)
    expected = (
        features.numpy().transpose(0, 2, 3, 1).reshape(2, -1)
    )  # Keras: height, width, channel
    np.testing.assert_array_equal(flat.numpy(), expected)
    assert flat.data_ptr() == features.data_ptr()  # a view of the feature map, not a copy


def test_more_classes_get_one_unit_each_and_softmax():
    net = networks.build("seed_cnn", num_classes=10, image_size=32)
    logits = net(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    probabilities = networks.probabilities(logits)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(4))


def test_binary_head_uses_sigmoid_and_binary_cross_entropy():
    logits = torch.tensor([[2.0], [-1.0]])
    probabilities = networks.probabilities(logits)
    torch.testing.assert_close(probabilities[:, 1], torch.sigmoid(logits[:, 0]))
    expected = nn.functional.binary_cross_entropy(
        torch.sigmoid(logits[:, 0]), torch.tensor([1.0, 0.0])
    )
    torch.testing.assert_close(networks.loss(logits, torch.tensor([1, 0])), expected)


@pytest.mark.parametrize("name", ["small_cnn", "seed_cnn"])
def test_scratch_models_accept_the_image_size(name):
    net = networks.build(name, num_classes=3, image_size=24)
    assert net(torch.randn(2, 3, 24, 24)).shape == (2, 3)


def _imagenet_class(net: nn.Module, image: np.ndarray) -> tuple[int, float]:
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    pixels = nn.functional.interpolate(pixels, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = (
        torch.tensor(v).view(1, 3, 1, 1) for v in networks.normalisation("efficientnet_lite0")
    )
    probabilities = net((pixels - mean) / std).softmax(-1)[0]
    return int(probabilities.argmax()), float(probabilities.max())


def test_offline_efficientnet_lite0_weights_still_recognise_imagenet_classes():
    net, _ = networks._timm_backbone(models.MODELS["efficientnet_lite0"], pretrained=True)
    net.eval()
    with torch.no_grad():
        cat, cat_p = _imagenet_class(net, data.chelsea())
        coffee, _ = _imagenet_class(net, data.coffee())
    assert cat == 285 and cat_p > 0.5  # Egyptian cat
    assert coffee == 967  # espresso


def test_transfer_net_has_a_new_head_and_a_frozen_backbone_option():
    net = networks.build(
        "efficientnet_lite0", num_classes=3, image_size=16, input_size=32, pretrained=True
    )
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    head = net.head_parameters()
    assert [p.shape for p in head] == [torch.Size([3, 1280]), torch.Size([3])]
    net.freeze_backbone(True)
    assert not any(p.requires_grad for p in net.backbone_parameters())
    assert all(p.requires_grad for p in head)
    net.train()
    assert not net.backbone.bn1.training and net.backbone.classifier.training


EXPECTED_NORMALISATION = {
    "seed_cnn": (0.5, 0.5),
    "small_cnn": (0.5, 0.5),
    "efficientnet_lite0": (0.5, 0.5),  # TensorFlow's lite models scale pixels to [-1, 1]
    "resnet18": (0.485, 0.229),  # ImageNet statistics, from torchvision's weights
    "mobilenet_v3_small": (0.485, 0.229),
    "efficientnet_b0": (0.485, 0.229),
}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_table_entry_builds_runs_and_reports_its_normalisation(name):
    """Each entry of the model table, without downloading anything: its network answers a
    batch with one unit (two classes) or one per class, and its mean/std come from the
    library's own metadata."""
    for classes, units in ((2, 1), (5, 5)):
        net = networks.build(name, num_classes=classes, image_size=24, input_size=32).eval()
        with torch.no_grad():
            assert net(torch.randn(2, 3, 24, 24)).shape == (2, units)
    mean, std = networks.normalisation(name)
    assert len(mean) == len(std) == 3
    assert (mean[0], std[0]) == pytest.approx(EXPECTED_NORMALISATION[name])
    if models.MODELS[name].stage == "transfer":
        assert {id(p) for p in net.head_parameters()}.isdisjoint(map(id, net.backbone_parameters()))
        assert [p.shape[0] for p in net.head_parameters()] == [5, 5]


def test_torchvision_weights_that_cannot_be_fetched_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a closed local port: no network
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="could not fetch ImageNet weights for resnet18.*none"):
        networks.build("resnet18", num_classes=2, image_size=32, pretrained=True)


def test_the_table_says_which_stage_builds_each_model():
    assert {spec.stage for spec in models.MODELS.values()} == {"train", "transfer"}
    assert all(
        spec.library in networks.BACKBONES or spec.library == "cnnpipe"
        for spec in models.MODELS.values()
    )


def test_every_model_in_the_table_says_how_it_trains_privately():
    for name, spec in models.MODELS.items():
        assert spec.private == ("whole" if spec.stage == "train" else "head"), name
