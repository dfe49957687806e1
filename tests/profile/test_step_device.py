"""The profile step is device-bound: it never waits on the device, and its memory options keep its results.

On CPU nothing waits, so the no-sync property is checked by what would wait on a GPU: every aten op that reads
a device value on the host (``_local_scalar_dense``: ``.item()``, ``bool()``, ``int()``, ``float()``; ops with
data-dependent output shapes such as ``nonzero`` and ``unique``) and the Python methods that copy a tensor to
the host (``.cpu()``, ``.numpy()``, ``.tolist()``, ``__array__``). Inside a step the host-side bookkeeping is
numpy, so any of those on a tensor is a regression. The CUDA variant runs the same steps under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from userip.codebook.config import QuantizationConfig
from userip.profile.bank import build_aux
from userip.profile.lm import LMConfig, auto_table_device, load_causal_lm
from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer, plan_batches
from userip.prompts import collate
from userip.utils.config import ConfigError

from .conftest import gpt2_config, history_dataset, llama_config, make_setup

aten = torch.ops.aten
# Ops that make the host wait for the device: a scalar read, or an output whose size depends on values.
HOST_WAIT_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
HOST_COPY_METHODS = ("cpu", "numpy", "tolist", "__array__")


class HostSyncRecorder(TorchDispatchMode):
    """Records, in order, each host wait (``HOST_WAIT_OPS``) and host copy (``HOST_COPY_METHODS``).

    ``host_tensors``: tensors that live on the host whatever the device (AdamW's step counters): reading
    them waits on nothing, so their scalar reads are not recorded.
    """

    def __init__(self, host_tensors: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.events: list[str] = []
        self.host_tensors = list(host_tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_WAIT_OPS and not any(args and args[0] is t for t in self.host_tensors):
            self.events.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_host_syncs(host_tensors: Sequence[torch.Tensor] = ()) -> Iterator[HostSyncRecorder]:
    recorder = HostSyncRecorder(host_tensors)
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPY_METHODS}

    def counting(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            recorder.events.append(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    try:
        for name in HOST_COPY_METHODS:
            setattr(torch.Tensor, name, counting(name))
        with recorder:
            yield recorder
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _trainer(lm, tokenizer, **overrides) -> ProfileTrainer:
    model, examples = make_setup(lm, tokenizer, history_dataset(num_users=24))
    config = dict(lr=0.05, batch_size=4, num_epochs=2, checkpoint_every=0, seed=3, progress=False)
    config.update(overrides)
    return ProfileTrainer(model, examples, ProfileTrainConfig(**config))


def _groups(trainer: ProfileTrainer, count: int) -> list[list]:
    batches = plan_batches(trainer.lengths, trainer.config.batch_size, trainer.config.seed, 0)
    k = trainer.config.grad_accum_steps
    return [batches[i * k : (i + 1) * k] for i in range(count)]


def test_recorder_sees_each_kind_of_host_sync():
    """The recorder itself: each way a step could wait on the device is recorded (else the tests below
    could pass on a step that syncs)."""
    x = torch.arange(4.0)
    with record_host_syncs() as rec:
        x.sum().item()
        bool(x.any())
        float(x[0])
        x.nonzero()
        torch.unique(x)
        x.tolist()
        x.cpu()
        x.numpy()
    assert rec.events == [
        "_local_scalar_dense",
        "_local_scalar_dense",
        "_local_scalar_dense",
        "nonzero",
        "_unique2",
        "Tensor.tolist",
        "Tensor.cpu",
        "Tensor.numpy",
    ]


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_steps_never_wait_on_the_device(tiny_llama, word_tokenizer, grad_accum_steps):
    trainer = _trainer(tiny_llama, word_tokenizer, grad_accum_steps=grad_accum_steps, batch_size=2)
    groups = _groups(trainer, 4)
    trainer._step(groups[0])  # first call: lazy initialisation of anything may read values once
    with record_host_syncs() as rec:
        for group in groups[1:]:
            losses, tokens, _ = trainer._step(group)
    assert rec.events == []
    assert isinstance(tokens, int) and losses.shape == (grad_accum_steps,)


def _joint_trainer(
    lm, tokenizer, dead_code_threshold: int = 50, device: str = "cpu", **overrides
) -> ProfileTrainer:
    """The LM step with the joint objective (codebooks + surrogate, user features on): k-means initialises
    from the first batch (``kmeans_init_samples`` = the largest codebook, 4)."""
    dataset = history_dataset(num_users=24)
    model, examples = make_setup(lm, tokenizer, dataset)
    quantization = QuantizationConfig(
        kmeans_init_samples=4, loss_weight=1.0, dead_code_threshold=dead_code_threshold
    )
    aux = build_aux(dataset, model.prompt_config.profiles, model.table.weight.shape[-1], quantization)
    model.table.to(device)
    aux.to(device)
    config = dict(lr=0.05, batch_size=4, num_epochs=2, checkpoint_every=0, seed=3, progress=False)
    config.update(overrides)
    trainer = ProfileTrainer(model, examples, ProfileTrainConfig(**config), aux=aux)
    trainer.aux.train()
    return trainer


def _adamw_steps(trainer: ProfileTrainer) -> list[torch.Tensor]:
    """AdamW's step counters: CPU tensors on every device (``capturable=False``), read as host floats."""
    assert trainer.aux_optimizer is not None
    steps = [state["step"] for state in trainer.aux_optimizer.state.values()]
    assert steps and all(t.device.type == "cpu" for t in steps)
    return steps


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_joint_objective_steps_never_wait_on_the_device(tiny_llama, word_tokenizer, grad_accum_steps):
    """Codebooks + surrogate: after the step that runs the k-means init, no host read per step (the
    dead-code counts are read only once a code can be dead: threshold 50 here, see the codebook tests)."""
    trainer = _joint_trainer(tiny_llama, word_tokenizer, grad_accum_steps=grad_accum_steps)
    groups = _groups(trainer, 6 // grad_accum_steps)  # 24 users in batches of 4: 6 micro-batches
    trainer._step(groups[0])  # the k-means init: a one-off read of the collected profiles
    quantizers = trainer.aux.quantizer.quantizers
    assert all(q.is_initialized for q in quantizers)
    with record_host_syncs(_adamw_steps(trainer)) as rec:
        for group in groups[1:]:
            losses, tokens, metrics = trainer._step(group)
    assert rec.events == []
    assert losses.shape == (grad_accum_steps,) and int(trainer.aux.step) == 6
    assert {"vq_loss", "rec_loss", "aux_loss", "perplexity_hobby"} <= set(metrics)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_no_lm_steps_never_wait_on_the_device(grad_accum_steps):
    """``lm: none`` (``SurrogateOnlyTrainer``): the objective alone, the same no-read step; the objective
    draws its interactions once per micro-batch, as in the LM step."""
    from userip.lm.offline_config import OfflineLMConfig
    from userip.profile.model import SoftTokenModel
    from userip.profile.no_lm import SurrogateOnlyTrainer, initial_table, user_examples
    from userip.prompts import PromptConfig

    dataset = history_dataset(num_users=24)
    prompt = PromptConfig()
    model = SoftTokenModel(initial_table(24, prompt, OfflineLMConfig(hidden_size=32), 0), prompt)
    quantization = QuantizationConfig(kmeans_init_samples=4, loss_weight=1.0, dead_code_threshold=50)
    aux = build_aux(dataset, prompt.profiles, 32, quantization)
    config = ProfileTrainConfig(
        lr=0.05, batch_size=4, num_epochs=2, checkpoint_every=0, seed=3, progress=False,
        grad_accum_steps=grad_accum_steps,
    )  # fmt: skip
    trainer = SurrogateOnlyTrainer(model, user_examples(dataset), config, aux=aux)
    trainer.aux.train()
    groups = _groups(trainer, 6 // grad_accum_steps)
    trainer._step(groups[0])  # the k-means init
    with record_host_syncs(_adamw_steps(trainer)) as rec:
        for group in groups[1:]:
            losses, tokens, _ = trainer._step(group)
    assert rec.events == []
    assert losses.shape == (grad_accum_steps,) and tokens == 0 and int(trainer.aux.step) == 6


def test_joint_objective_metrics_are_read_only_when_logging(tiny_llama, word_tokenizer):
    """6 steps, log_every 3: per log one copy of the losses and one of the aux metrics; the rest of the
    reads are the one-off k-means init at step 1 (no read from the revival check: threshold 50)."""
    trainer = _joint_trainer(tiny_llama, word_tokenizer, max_steps=6, log_every=3, num_epochs=1)
    trainer.train(stop_after_steps=1)  # k-means init
    with record_host_syncs(_adamw_steps(trainer)) as rec:
        result = trainer.train()
    assert rec.events == ["Tensor.cpu", "Tensor.tolist"] * 4, rec.events
    assert len(result.loss_history) == 6 and all(isinstance(v, float) for v in result.loss_history)
    assert all(isinstance(v, float) for v in result.aux_metrics.values()) and "rec_loss" in result.aux_metrics


def test_training_loop_reads_the_loss_only_every_log_every_steps(tiny_llama, word_tokenizer):
    """6 steps, log_every 3: two reads (one copy of all unread losses each), whatever the step count."""
    trainer = _trainer(tiny_llama, word_tokenizer, max_steps=6, log_every=3, num_epochs=1)
    assert trainer.total_steps == 6
    with record_host_syncs() as rec:
        result = trainer.train()
    assert rec.events == ["Tensor.cpu", "Tensor.tolist"] * 2
    assert len(result.loss_history) == 6 and all(isinstance(v, float) for v in result.loss_history)


def test_losses_read_later_equal_per_step_item(tiny_llama, word_tokenizer):
    """Reading the losses every log_every steps gives the values a per-step ``.item()`` gave."""
    a = _trainer(tiny_llama, word_tokenizer, grad_accum_steps=2, batch_size=2, log_every=50)
    per_step = []
    for group in _groups(a, 3):
        losses, _, _ = a._step(group)
        total = 0.0
        for loss in losses:
            total += loss.item() / len(losses)
        per_step.append(total)
    b = _trainer(tiny_llama, word_tokenizer, grad_accum_steps=2, batch_size=2, log_every=50, max_steps=3)
    assert b.train().loss_history == per_step


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``fn`` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("make_config", [llama_config, gpt2_config], ids=["llama", "gpt2"])
def test_activation_checkpointing_keeps_loss_and_gradients(word_tokenizer, make_config):
    torch.manual_seed(0)
    config = make_config(len(word_tokenizer))
    if hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = 4
    else:
        config.n_layer = 4
    lm = load_causal_lm(config, dtype="fp32", device="cpu")
    model, examples = make_setup(lm, word_tokenizer, history_dataset(num_users=8))
    batch = collate([examples[i] for i in range(len(examples))], examples.builder.pad_token_id)
    results = {}
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        rows = model.gather_rows(batch.user_ids).requires_grad_(True)
        saved, (nll, count) = _saved_bytes(lambda rows=rows: model(batch, rows))
        nll.backward()
        results[enabled] = (saved, nll.detach(), count, rows.grad)
    (saved_off, nll_off, count_off, grad_off), (saved_on, nll_on, count_on, grad_on) = results.values()
    assert torch.equal(nll_on, nll_off) and torch.equal(count_on, count_off)
    assert torch.equal(grad_on, grad_off)
    # The option is really on: the layers' activations are not kept (4 layers: well under half).
    assert saved_on < 0.5 * saved_off
    model.set_activation_checkpointing(False)
    assert _saved_bytes(lambda: model(batch, model.gather_rows(batch.user_ids).requires_grad_(True)))[0] == (
        saved_off
    )


def test_training_with_activation_checkpointing_gives_the_same_table(word_tokenizer):
    tables = []
    for enabled in (False, True):
        torch.manual_seed(0)
        lm = load_causal_lm(llama_config(len(word_tokenizer)), dtype="fp32", device="cpu")
        trainer = _trainer(lm, word_tokenizer, activation_checkpointing=enabled, grad_accum_steps=2)
        trainer.train()
        tables.append(trainer.model.table.weight.clone())
    assert torch.equal(tables[0], tables[1])


def test_table_device_auto_by_size(monkeypatch):
    assert LMConfig(name_or_path="x").table_device == "auto"
    assert LMConfig(name_or_path="x").resolved_table_device(10, 3, 8) == "cpu"  # CPU LM: CPU table
    assert LMConfig(name_or_path="x", table_device="cpu").resolved_table_device(10, 3, 8) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * 2**20, 8000 * 2**20))
    # table + 2 Adam moments in fp32 = 12 bytes per element; limit: a quarter of 1000 MiB free
    assert auto_table_device("cuda", 20 * 2**20) == "cuda"  # 240 MiB
    assert auto_table_device("cuda:0", 21 * 2**20) == "cpu"  # 252 MiB
    with pytest.raises(ConfigError, match=r"lm.table_device must be 'cpu' or 'cuda\[:N\]'.*'auto'"):
        LMConfig(name_or_path="x", table_device="gpu")
    with pytest.raises(ConfigError, match="lm.tf32"):
        LMConfig(name_or_path="x", tf32="yes")


def test_pad_to_multiple_of_automatic_is_none_on_cpu(tiny_llama, word_tokenizer):
    assert _trainer(tiny_llama, word_tokenizer).pad_to_multiple_of == 1
    assert _trainer(tiny_llama, word_tokenizer, pad_to_multiple_of=8).pad_to_multiple_of == 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("table_device", ["cpu", "cuda"])
def test_cuda_steps_never_synchronize(word_tokenizer, table_device):
    """On a GPU: steps under ``set_sync_debug_mode("error")`` (any synchronising CUDA call raises) once the
    table is on the GPU; with a CPU table the gradient's copy back is the one expected wait."""
    torch.manual_seed(0)
    lm = load_causal_lm(llama_config(len(word_tokenizer)), dtype="bf16", device="cuda")
    assert torch.backends.cuda.matmul.allow_tf32  # load_causal_lm on CUDA turns TF32 on by default
    model, examples = make_setup(lm, word_tokenizer, history_dataset(num_users=12))
    model.table.to(table_device)
    trainer = ProfileTrainer(
        model, examples, ProfileTrainConfig(batch_size=4, progress=False, checkpoint_every=0)
    )
    assert trainer.pad_to_multiple_of == 64
    groups = _groups(trainer, 4)
    trainer._step(groups[0])
    torch.cuda.synchronize()
    if table_device == "cpu":
        for group in groups[1:]:
            trainer._step(group)
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        with record_host_syncs() as rec:
            for group in groups[1:]:
                trainer._step(group)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rec.events == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_joint_objective_steps_never_synchronize(word_tokenizer):
    """The joint objective on the GPU (table, codebooks and surrogate there): after the k-means init step,
    steps under ``set_sync_debug_mode("error")``; AdamW's step counters stay CPU tensors (no CUDA wait)."""
    torch.manual_seed(0)
    lm = load_causal_lm(llama_config(len(word_tokenizer)), dtype="bf16", device="cuda")
    trainer = _joint_trainer(lm, word_tokenizer, device="cuda", num_epochs=1)
    assert trainer.model.table.weight.is_cuda and trainer.aux.quantizer.codebook("hobby").is_cuda
    groups = _groups(trainer, 5)
    trainer._step(groups[0])  # k-means init (reads the held profiles once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with record_host_syncs(_adamw_steps(trainer)) as rec:
            for group in groups[1:]:
                trainer._step(group)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rec.events == []
