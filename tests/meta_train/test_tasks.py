"""Optimizee tasks: parameter counts, reference forwards, gradients, determinism, the tricks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meta_train.data import ImageDataset, load_mnist
from meta_train.tasks import (
    TEST_LOSS,
    TEST_TOP1,
    TEST_TOP2,
    CNNTask,
    MixedTask,
    MLPTask,
    SineLSTMTask,
    Task,
)

LN10 = math.log(10)


def fake_dataset(name="mnist", n_train=300, n_test=1200, seed=0):
    """Random images with the real shapes (MNIST flat rows, CIFAR NCHW); fast to build."""
    g = torch.Generator().manual_seed(seed)
    shape = (784,) if name == "mnist" else (3, 32, 32)
    image_shape = (1, 28, 28) if name == "mnist" else (3, 32, 32)
    return ImageDataset(
        torch.rand(n_train, *shape, generator=g),
        torch.randint(10, (n_train,), generator=g),
        torch.rand(n_test, *shape, generator=g),
        torch.randint(10, (n_test,), generator=g),
        name,
        image_shape,
    )


MNIST, CIFAR = fake_dataset("mnist"), fake_dataset("cifar10")


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def autograd_loss_and_grad(task, params, batch):
    """The base class's autograd implementation, bypassing any hand-written override."""
    return Task.loss_and_grad(task, params, batch)


# --- parameter counts --------------------------------------------------------------------------


@pytest.mark.parametrize("depth", range(1, 11))
def test_mlp_parameter_count(depth):
    assert MLPTask(MNIST, depth=depth).num_params == 15_910 + 420 * (depth - 1)


@pytest.mark.parametrize(
    ("dataset", "arch", "expected"),
    [
        (MNIST, "cnn1", 33_850),
        (MNIST, "cnn2", 117_434),
        (CIFAR, "cnn1", 43_738),
        (CIFAR, "cnn2", 148_442),
    ],
    ids=["mnist-cnn1", "mnist-cnn2", "cifar-cnn1", "cifar-cnn2"],
)
def test_cnn_parameter_count(dataset, arch, expected):
    assert CNNTask(dataset, arch=arch).num_params == expected
    assert CNNTask(dataset, arch=arch, batch_norm=True).num_params == expected  # BN adds none


@pytest.mark.parametrize(("layers", "expected"), [(1, 1_781), (2, 5_061)])
def test_lstm_parameter_count(layers, expected):
    assert SineLSTMTask(num_layers=layers).num_params == expected


# --- losses at initialisation on real MNIST ----------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        *(lambda ds, a=a: MLPTask(ds, activation=a) for a in ("sigmoid", "relu", "elu", "tanh")),
        lambda ds: MLPTask(ds, depth=5),
        lambda ds: CNNTask(ds, arch="cnn1"),
        lambda ds: CNNTask(ds, arch="cnn2", dropout=True),
    ],
    ids=["sigmoid", "relu", "elu", "tanh", "sigmoid-l5", "cnn1", "cnn2-dropout"],
)
def test_classifier_loss_at_init_is_about_ln10(make):
    task = make(load_mnist())
    g = seeded(0)
    params = task.init_params(g)
    loss, grad = task.loss_and_grad(params, task.sample_batch(g))
    assert abs(float(loss) - LN10) < 0.3
    assert grad.shape == params.shape and torch.isfinite(grad).all()


def test_init_is_normal_with_std_0_1():
    params = MLPTask(MNIST, depth=10).init_params(seeded(1))
    assert abs(float(params.mean())) < 0.003 and abs(float(params.std()) - 0.1) < 0.002


# --- the hand-written MLP gradient equals autograd ---------------------------------------------


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "elu", "tanh"])
@pytest.mark.parametrize("depth", [1, 3])
def test_mlp_hand_written_gradient_matches_autograd(activation, depth):
    task = MLPTask(MNIST, depth=depth, activation=activation, batch_size=64)
    g = seeded(2)
    params, batch = task.init_params(g) * 5, task.sample_batch(g)  # larger weights: saturation
    loss, grad = task.loss_and_grad(params, batch)
    ref_loss, ref_grad = autograd_loss_and_grad(task, params, batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert not grad.requires_grad and not loss.requires_grad


def test_mlp_gradient_is_a_fresh_tensor_each_call():
    task = MLPTask(MNIST)
    g = seeded(3)
    params = task.init_params(g)
    _, first = task.loss_and_grad(params, task.sample_batch(g))
    kept = first.clone()
    task.loss_and_grad(params, task.sample_batch(g))
    assert torch.equal(first, kept)


def test_mlp_gradient_of_a_sliced_or_strided_parameter_vector():
    task = MLPTask(MNIST, depth=2)
    g = seeded(19)
    params, batch = task.init_params(g), task.sample_batch(g)
    loss, grad = task.loss_and_grad(params, batch)
    sliced = torch.cat([torch.ones(7), params])[7:]  # storage offset 7
    strided = torch.stack([params, params], dim=1)[:, 0]  # stride 2
    for other in (sliced, strided):
        other_loss, other_grad = task.loss_and_grad(other, batch)
        assert torch.equal(other_loss, loss) and torch.equal(other_grad, grad)


def test_layout_views_refuse_wrong_vectors():
    layout = MLPTask(MNIST).layout
    with pytest.raises(ValueError, match=r"views needs a contiguous \[15910\] vector, got \(3,\)"):
        layout.views(torch.zeros(3))


# --- forwards against torch.nn references -------------------------------------------------------


def test_mlp_forward_matches_nn_sequential():
    task = MLPTask(MNIST, depth=2, activation="elu")
    params = task.init_params(seeded(4))
    w = task.layout.unflatten(params)
    ref = nn.Sequential(
        nn.Linear(784, 20), nn.ELU(), nn.Linear(20, 20), nn.ELU(), nn.Linear(20, 10)
    )
    with torch.no_grad():
        for i, layer in enumerate([ref[0], ref[2], ref[4]]):
            layer.weight.copy_(w[2 * i].t())
            layer.bias.copy_(w[2 * i + 1])
        x = MNIST.test_images[:32]
        assert torch.allclose(task.logits(params, x), ref(x), atol=1e-5)


@pytest.mark.parametrize("dataset", [MNIST, CIFAR], ids=["mnist", "cifar"])
def test_cnn2_forward_matches_nn_reference(dataset):
    task = CNNTask(dataset, arch="cnn2")
    params = task.init_params(seeded(5))
    w = task.layout.unflatten(params)
    c, h, _ = dataset.image_shape
    ref = nn.Sequential(
        nn.Conv2d(c, 16, 3, padding="same"),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding="same"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding="same"),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding="same"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) ** 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    layers = [m for m in ref if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            weight = w[2 * i] if isinstance(layer, nn.Conv2d) else w[2 * i].t()
            layer.weight.copy_(weight)
            layer.bias.copy_(w[2 * i + 1])
        x = dataset.test_images[:8]
        expected = ref(x.reshape(8, *dataset.image_shape))
        assert torch.allclose(task.logits(params, x), expected, atol=1e-4)


def test_cnn_batch_norm_normalises_over_the_batch_axis():
    task = CNNTask(MNIST, arch="cnn1", batch_norm=True)
    params = task.init_params(seeded(6))
    w = task.layout.unflatten(params)
    x = MNIST.test_images[:16].reshape(16, 1, 28, 28)

    def bn(a):  # tf.nn.moments(a, axes=[0]) then normalise, no scale/shift
        return (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)

    a = bn(torch.relu(F.conv2d(x, w[0], w[1], padding=1)))
    a = F.max_pool2d(bn(torch.relu(F.conv2d(a, w[2], w[3], padding=1))), 2)
    expected = a.flatten(1) @ w[4] + w[5]
    assert torch.allclose(task.logits(params, MNIST.test_images[:16]), expected, atol=1e-4)


def test_cnn_dropout_mask_is_drawn_in_the_batch_and_off_in_test_metrics():
    task = CNNTask(MNIST, arch="cnn2", dropout=True, batch_size=32)
    plain = CNNTask(MNIST, arch="cnn2", batch_size=32)
    g = seeded(7)
    params = task.init_params(g)
    images, labels, mask = task.sample_batch(g)
    assert mask.shape == (32, 64) and set(mask.unique().tolist()) <= {0.0, 2.0}
    assert 0.3 < float((mask > 0).float().mean()) < 0.7
    ones = torch.ones_like(mask)
    assert torch.allclose(
        task.loss(params, (images, labels, ones)), plain.loss(params, (images, labels))
    )
    assert not torch.allclose(
        task.loss(params, (images, labels, mask)), plain.loss(params, (images, labels))
    )
    assert task.test_metrics(params) == plain.test_metrics(params)


def test_sine_lstm_matches_torch_lstm():
    task = SineLSTMTask(num_layers=2)
    params = task.init_params(seeded(8))
    w = task.layout.unflatten(params)
    ref = nn.LSTM(1, 20, num_layers=2, batch_first=True)
    order = torch.cat(
        [torch.arange(0, 40), torch.arange(60, 80), torch.arange(40, 60)]
    )  # ifog→ifgo
    with torch.no_grad():
        for layer, fan_in in ((0, 1), (1, 20)):
            kernel, bias = w[2 * layer], w[2 * layer + 1]
            getattr(ref, f"weight_ih_l{layer}").copy_(kernel[:fan_in, order].t())
            getattr(ref, f"weight_hh_l{layer}").copy_(kernel[fan_in:, order].t())
            getattr(ref, f"bias_ih_l{layer}").copy_(bias[order])
            getattr(ref, f"bias_hh_l{layer}").zero_()
        inputs, _ = task.sample_batch(seeded(9))
        out, _ = ref(inputs.unsqueeze(2))
        expected = (out[:, -1] @ w[-2] + w[-1]).squeeze(1)
        assert torch.allclose(task.predict(params, inputs), expected, atol=1e-5)


def test_sine_lstm_loss_is_mse_and_differentiable():
    task = SineLSTMTask(noise_std=0.01)
    g = seeded(10)
    params, batch = task.init_params(g), task.sample_batch(g)
    loss, grad = task.loss_and_grad(params, batch)
    expected = ((task.predict(params, batch[0]) - batch[1]) ** 2).mean()
    assert torch.allclose(loss, expected) and torch.isfinite(grad).all() and grad.abs().sum() > 0


# --- determinism ------------------------------------------------------------------------------

TASKS = {
    "mlp": lambda: MLPTask(MNIST),
    "cnn2-dropout": lambda: CNNTask(CIFAR, arch="cnn2", dropout=True),
    "lstm": lambda: SineLSTMTask(),
    "mixed": lambda: MixedTask(MLPTask(MNIST), seed=1, random_scaling=True, convex=True),
}


@pytest.mark.parametrize("make", TASKS.values(), ids=TASKS.keys())
def test_same_seed_same_init_and_batches(make):
    task = make()

    def draw(seed):
        g = seeded(seed)
        return task.init_params(g), task.sample_batch(g)

    (p1, b1), (p2, b2), (p3, b3) = draw(11), draw(11), draw(12)
    assert torch.equal(p1, p2) and all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))
    assert not torch.equal(p1, p3) and not torch.equal(b1[0], b3[0])
    loss1, grad1 = task.loss_and_grad(p1, b1)
    loss2, grad2 = task.loss_and_grad(p2, b2)
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)


# --- test metrics -----------------------------------------------------------------------------


def test_test_metrics_cover_the_whole_test_split():
    task = MLPTask(MNIST)  # 1,200 test images: three evaluation chunks, the last one partial
    params = task.init_params(seeded(13))
    metrics = task.test_metrics(params)
    assert set(metrics) == {TEST_LOSS, TEST_TOP1, TEST_TOP2}
    logits = task.logits(params, MNIST.test_images)
    top2 = logits.topk(2, dim=1).indices
    assert metrics[TEST_LOSS] == pytest.approx(
        float(F.cross_entropy(logits, MNIST.test_labels)), rel=1e-5
    )
    assert metrics[TEST_TOP1] == pytest.approx(
        float((top2[:, 0] == MNIST.test_labels).float().mean())
    )
    assert metrics[TEST_TOP2] == pytest.approx(
        float((top2 == MNIST.test_labels[:, None]).any(1).float().mean())
    )
    assert 0 <= metrics[TEST_TOP1] <= metrics[TEST_TOP2] <= 1


def test_sine_lstm_has_no_test_metrics():
    task = SineLSTMTask()
    assert task.test_metrics(task.init_params(seeded(0))) == {}


# --- MixedTask (spec §3.1) --------------------------------------------------------------------


def mixed(seed=3, **kwargs):
    options = {"random_scaling": True, "convex": True, **kwargs}
    return MixedTask(MLPTask(MNIST, batch_size=32), seed=seed, **options)


def test_mixed_layout_and_scales():
    task = mixed()
    assert task.num_params == 15_910 + 20
    assert task.c1.shape == (15_910,) and task.c2.shape == (20,) and task.eta.shape == (20,)
    assert float(task.c1.log().abs().max()) <= 3.0 and float(task.c1.log().abs().max()) > 2.9
    assert float(task.c2.log().abs().max()) <= 1.0 and float(task.eta.abs().max()) <= 1.0
    assert mixed(convex=False).num_params == 15_910


def test_mixed_without_scaling_has_unit_scales_and_the_same_eta():
    plain, scaled = mixed(random_scaling=False), mixed()
    assert torch.equal(plain.c1, torch.ones(15_910)) and torch.equal(plain.c2, torch.ones(20))
    assert torch.equal(plain.eta, scaled.eta)
    assert not torch.equal(mixed(seed=4).c1, scaled.c1)


def test_mixed_init_starts_the_effective_network_at_the_inner_init():
    task = mixed()
    w0 = task.init_params(seeded(14))
    expected = task.inner.init_params(seeded(14))
    assert torch.allclose(task.c1 * w0[:15_910], expected, rtol=1e-6)
    assert torch.equal(w0[15_910:], torch.zeros(20))


@pytest.mark.parametrize("convex", [True, False])
def test_mixed_gradient_is_the_scaled_inner_gradient(convex):
    task = mixed(convex=convex)
    g = seeded(15)
    params, batch = task.init_params(g), task.sample_batch(g)
    if convex:
        params[15_910:] = torch.linspace(-2, 2, 20)
    loss, grad = task.loss_and_grad(params, batch)
    ref_loss, ref_grad = autograd_loss_and_grad(task, params, batch)
    assert torch.allclose(loss, ref_loss, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-6)
    inner_loss, inner_grad = task.inner.loss_and_grad(task.c1 * params[:15_910], batch)
    assert torch.allclose(grad[:15_910], task.c1 * inner_grad)
    assert torch.allclose(loss, inner_loss + task.convex_loss(params[15_910:]))


def test_mixed_convex_term_is_clipped_at_10():
    task = mixed()
    z = torch.zeros(20)
    z[:5] = 100.0 / task.c2[:5]  # (c2 z − η)² ≈ 1e4 > 10: clipped, no gradient
    z[5:] = (task.eta[5:] + 0.5) / task.c2[5:]  # residual 0.5 everywhere else
    params = torch.cat([task.init_params(seeded(16))[:15_910], z])
    batch = task.sample_batch(seeded(17))
    _, grad = task.loss_and_grad(params, batch)
    assert torch.equal(grad[15_910:15_915], torch.zeros(5))
    assert torch.allclose(grad[15_915:], 2 * 0.5 * task.c2[5:] / 20, rtol=1e-4)
    expected = (5 * 10.0 + 15 * 0.25) / 20
    assert float(task.convex_loss(z)) == pytest.approx(expected, rel=1e-5)


def test_mixed_test_metrics_use_the_effective_parameters():
    task = mixed()
    params = task.init_params(seeded(18))
    assert task.test_metrics(params) == task.inner.test_metrics(task.c1 * params[:15_910])


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: MLPTask(MNIST, hidden=0), ValueError, r"hidden must be >= 1, got 0"),
        (lambda: MLPTask(MNIST, depth=0), ValueError, r"depth must be >= 1, got 0"),
        (lambda: MLPTask(MNIST, activation="gelu"), ValueError, r"activation must be one of"),
        (lambda: MLPTask(MNIST, batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
        (
            lambda: CNNTask(MNIST, arch="cnn3"),
            ValueError,
            r"arch must be one of \('cnn1', 'cnn2'\)",
        ),
        (lambda: CNNTask(MNIST, dropout=True), ValueError, r"dropout needs a hidden FC layer"),
        (lambda: SineLSTMTask(num_layers=0), ValueError, r"num_layers must be >= 1, got 0"),
        (lambda: SineLSTMTask(noise_std=-1), ValueError, r"noise_std must be >= 0, got -1"),
        (lambda: mixed(num_convex=0), ValueError, r"num_convex must be >= 1, got 0"),
        (lambda: mixed(log_scale_w=-1.0), ValueError, r"log scales must be >= 0"),
    ],
    ids=[
        "hidden",
        "depth",
        "activation",
        "batch",
        "arch",
        "dropout",
        "layers",
        "noise",
        "num_convex",
        "log_scale",
    ],
)
def test_task_arguments_are_validated(make, error, message):
    with pytest.raises(error, match=message):
        make()
