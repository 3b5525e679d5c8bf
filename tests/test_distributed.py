"""Scale-out (SPEC §10): DDP and FSDP2, work-split mode, DCP checkpoints, for every optimizer.

One 2-process gloo run (``tests/_dist_worker.py``, started through ``whiten.bench.launch.launch``,
i.e. torchrun on 127.0.0.1) trains the tiny model of ``tests/_dist_common.py`` with every optimizer
under DDP and FSDP2, replicated and work-split, and resumes from a DCP checkpoint at step 10. The
tests here compare what each rank saw with a single-process run on the whole batch.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_common import HALF, OPTIMIZERS, STEPS, make_data, make_model, make_optimizer, reference, train
from whiten.bench import launch as wl
from whiten.optim import Muon
from whiten.optim import distributed as wd

REQUIRED = ["HTMuon", "KLShampoo", "Muon", "ProKLShampoo", "SOAP"]
# the 2-process run covers the five method families in every setup; KLSOAP and REKLS share their
# code paths with KLShampoo and SOAP and get only the FSDP2 runs (keeps `make test` fast)
MULTI = REQUIRED
BRIEF = [name for name in OPTIMIZERS if name not in MULTI]
KINDS = ["ddp", "fsdp"]
UNITS = ["KLShampoo", "Muon"]  # also run with one FSDP2 unit (and device mesh object) per layer
MATRICES = {"a.weight", "b.weight", "c.weight"}
VECTORS = {"a.bias", "norm.weight", "norm.bias", "c.bias"}  # routed to the AdamW fallback
NUMEL = {"a.weight": 49, "b.weight": 25, "c.weight": 144}
# optimizers whose step has phases (whiten.optim.distributed.is_phased): under FSDP2 their momentum
# stays sharded and only the map's inputs (U; KL-Shampoo's (M, G)) and, in split mode, the update O travel
PHASED = ["HTMuon", "KLShampoo", "Muon", "ProKLShampoo"]
NO_MAP_STATE = ["HTMuon", "Muon"]  # phased with no whole-matrix state in these settings (no NorMuon / stream basis)
MAP_INPUTS = {"HTMuon": 1, "Muon": 1, "KLShampoo": 2, "ProKLShampoo": 2}  # parameter-sized tensors to the map
RTOL = 1e-5  # the acceptance bound; the measured deviations are ~1e-16 .. 1e-12
LAUNCH_TIMEOUT_S = 600  # the 2-process run takes 30-60 s on 2 shared cores; a hang fails instead of blocking CI


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if not _gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("dist")
    x, y = make_data()
    for name in MULTI:  # 1-process checkpoints at step HALF, for the 2 ranks to resume from
        model = make_model()
        optimizer = make_optimizer(name, model)
        train(model, optimizer, x, y, HALF, micro_batches=2)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            wd.save_checkpoint(out / f"ckpt1-{name}", model, optimizer)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dist_worker.py")
    argv = [worker, str(out), *MULTI, *(f"+{name}" for name in BRIEF)]
    code = wl.launch(2, argv, module=False, timeout_s=LAUNCH_TIMEOUT_S)
    assert code == 0, f"2-process worker failed with exit code {code} (its output is above)"
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    results[0]["_dir"] = out
    return results


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[list[float], dict[str, torch.Tensor]]]:
    return {name: reference(name) for name in OPTIMIZERS}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def _assert_follows(result: dict, ref: tuple[list[float], dict[str, torch.Tensor]], rtol: float) -> None:
    losses, params = ref
    assert len(result["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(result["losses"], losses, strict=True)):
        assert abs(a - b) <= rtol * abs(b), f"loss at step {step}: {a} vs single-process {b}"
    for name, value in params.items():
        error = _rel(result["params"][name], value)
        assert error <= rtol, f"{name}: relative error {error} against the single-process run"


def test_every_optimizer_is_covered_and_phased_as_the_tests_assume() -> None:
    """The runs cover every optimizer class whiten.optim exports, and the constants the traffic and layout
    tests below rely on (PHASED, MAP_INPUTS) are what the implementation says, not a second copy."""
    import inspect

    import whiten.optim

    exported = {
        name
        for name in whiten.optim.__all__
        if isinstance(cls := getattr(whiten.optim, name), type)
        and issubclass(cls, whiten.optim.WhitenOptimizer)
        and not inspect.isabstract(cls)
    }
    assert exported == set(OPTIMIZERS) and set(REQUIRED) <= exported
    for name in OPTIMIZERS:
        optimizer = make_optimizer(name, make_model())
        assert wd.is_phased(optimizer) == (name in PHASED), name
        assert wd.gathered_tensors(optimizer) == MAP_INPUTS.get(name, 2), name


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["replicate", "split"])
@pytest.mark.parametrize("name", MULTI)
def test_two_ranks_follow_single_process(runs, references, name: str, kind: str, mode: str) -> None:
    for rank in range(2):
        _assert_follows(runs[rank][f"{name}/{kind}/{mode}"], references[name], RTOL)
    # and the run trained at all (a test that passes whatever the code does is no test)
    losses = runs[0][f"{name}/{kind}/{mode}"]["losses"]
    assert losses[-1] < losses[0]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["replicate", "split"])
@pytest.mark.parametrize("name", UNITS)
def test_fsdp_with_one_unit_per_layer(runs, references, name: str, mode: str) -> None:
    """fully_shard on every layer and the root (a device mesh object per unit): same results, and
    the matrices still travel in one batched all_to_all per exchange (not one gather per matrix)."""
    for rank in range(2):
        result = runs[rank][f"{name}/fsdp-units/{mode}"]
        _assert_follows(result, references[name], RTOL)
        assert result["comm_kinds"] == ["all_to_all"]
        assert result["comm_bytes_per_step"] == runs[rank][f"{name}/fsdp/{mode}"]["comm_bytes_per_step"]
        assert result["ownership"] == runs[rank][f"{name}/fsdp/{mode}"]["ownership"]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["replicate", "split"])
@pytest.mark.parametrize("name", BRIEF)
def test_other_optimizers_fsdp(runs, references, name: str, mode: str) -> None:
    for rank in range(2):
        result = runs[rank][f"{name}/fsdp/{mode}"]
        _assert_follows(result, references[name], RTOL)
        held = sum(has for _, has in result["ownership"].values())
        assert held == 3 if mode == "replicate" else held in (1, 2)  # split: a share of the 3 matrices


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["replicate", "split"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp_elementwise_state_stays_sharded(runs, name: str, mode: str) -> None:
    """AdamW state: DTensors shaped like this rank's shard. The phased methods' momentum (Muon, HTMuon,
    KL-Shampoo, Pro-KLShampoo): the same, on every rank. Matrix state (the others' momentum too): whole
    tensors, on the owner only in split mode."""
    for rank in range(2):
        result = runs[rank][f"{name}/fsdp/{mode}"]
        layout = result["state_layout"]
        assert set(layout) == MATRICES | VECTORS
        for vector in VECTORS:
            assert layout[vector] == ["shard", "shard"], f"{vector}: {layout[vector]}"  # exp_avg, exp_avg_sq
        for matrix in MATRICES:
            owner, _ = result["ownership"][matrix]
            sharded = ["shard"] if name in PHASED else []  # the momentum, on every rank
            whole = [kind for kind in layout[matrix] if kind != "shard"]
            assert layout[matrix].count("shard") == len(sharded), f"{matrix}: {layout[matrix]}"
            if name in NO_MAP_STATE or (mode == "split" and owner != rank):
                assert layout[matrix] == sharded, f"{matrix}: {layout[matrix]}"
            else:  # factors, bases, eigenvalues (the gather path's momentum too): whole tensors
                assert whole, f"{matrix}: {layout[matrix]}"


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MULTI)
def test_split_mode_equals_replicated_and_splits_the_work(runs, name: str, kind: str) -> None:
    split0, split1 = (runs[r][f"{name}/{kind}/split"] for r in range(2))
    replicated = runs[0][f"{name}/{kind}/replicate"]
    for key, value in replicated["params"].items():
        assert _rel(split0["params"][key], value) <= 1e-12
        assert torch.equal(split0["params"][key], split1["params"][key])  # ranks agree bit for bit
    # every matrix is computed (the method's _matrix_step, or for a phased method its map phase, is called
    # on it) and holds matrix state on exactly its assigned owner, in every one of the STEPS steps
    # (Muon/HTMuon under FSDP2: no matrix state at all, the momentum is sharded on every rank)
    owned = {0: set(), 1: set()}
    no_matrix_state = name in NO_MAP_STATE and kind == "fsdp"
    for rank, result in enumerate((split0, split1)):
        assert set(result["ownership"]) == set(result["computed"]) == MATRICES  # whole matrices only
        for matrix, (owner, has_state) in result["ownership"].items():
            assert owner in (0, 1)
            expected = owner == rank and not no_matrix_state
            assert has_state == expected, f"{matrix}: owner {owner}, state on rank {rank}: {has_state}"
            calls = result["computed"][matrix]
            assert calls == (STEPS if owner == rank else 0), f"{matrix} (owner {owner}) computed {calls}x on {rank}"
            if calls:
                owned[rank].add(matrix)
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == MATRICES
    # cost balancing: the 12x12 matrix costs more than the 7x7 and 5x5 together, so it is alone
    # (a count-balanced round robin over a, b, c would pair it with a)
    assert {"c.weight"} in (owned[0], owned[1])
    # replicated mode computes and keeps every matrix on every rank
    for rank in range(2):
        result = runs[rank][f"{name}/{kind}/replicate"]
        assert all(has != no_matrix_state for _, has in result["ownership"].values())
        assert result["computed"] == dict.fromkeys(MATRICES, STEPS)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MULTI)
def test_checkpoint_resume_equals_uninterrupted(runs, references, name: str, kind: str) -> None:
    for rank in range(2):
        resumed = runs[rank][f"{name}/{kind}/ckpt"]
        _assert_follows(resumed, references[name], RTOL)
        straight = runs[rank][f"{name}/{kind}/split"]
        for key, value in straight["params"].items():
            assert _rel(resumed["params"][key], value) <= 1e-12


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["KLShampoo", "Muon", "ProKLShampoo"])
def test_checkpoint_from_two_ranks_loads_on_one_process(runs, references, name: str, kind: str) -> None:
    """Save on 2 ranks in split mode, load on 1 process in replicate mode: state equal, run continues."""
    model, x, y = make_model(), *make_data()
    optimizer = make_optimizer(name, model)
    wd.load_checkpoint(runs[0]["_dir"] / f"ckpt-{name}-{kind}", model, optimizer)
    twin = make_model()
    twin_optimizer = make_optimizer(name, twin)
    train(twin, twin_optimizer, x, y, HALF, micro_batches=2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert _rel(p.detach(), q.detach()) <= 1e-9  # the 2-rank run vs this process: rounding only
        loaded, expected = optimizer.state[p], twin_optimizer.state[q]
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            assert type(loaded[key]) is type(value), f"{key}: {type(loaded[key])} vs {type(value)}"
            if isinstance(value, torch.Tensor):
                assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
                assert _rel(loaded[key].double(), value.double()) <= 1e-9
            else:  # plain ints (step counters) go through DCP as pickled bytes
                assert loaded[key] == value
    losses = train(model, optimizer, x, y, STEPS - HALF, micro_batches=2)
    ref_losses, ref_params = references[name]
    for a, b in zip(losses, ref_losses[HALF:], strict=True):
        assert abs(a - b) <= RTOL * abs(b)
    for key, param in model.named_parameters():
        assert _rel(param.detach(), ref_params[key]) <= RTOL


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MULTI)
def test_checkpoint_from_one_process_loads_on_two_ranks(runs, references, name: str, kind: str) -> None:
    """Save on 1 process (replicate) at step 10, load on 2 ranks in split mode: the last 10 steps
    follow the uninterrupted single-process run (the other direction of the world-size change)."""
    ref_losses, ref_params = references[name]
    for rank in range(2):
        result = runs[rank][f"{name}/{kind}/from1"]
        assert len(result["losses"]) == STEPS - HALF
        for step, (a, b) in enumerate(zip(result["losses"], ref_losses[HALF:], strict=True)):
            assert abs(a - b) <= RTOL * abs(b), f"loss at step {HALF + step}: {a} vs single-process {b}"
        for key, value in ref_params.items():
            assert _rel(result["params"][key], value) <= RTOL, key


@pytest.mark.distributed
def test_split_volume_matches_the_model(runs) -> None:
    """DDP split: rank 0 sends what it owns once and receives the rest (fp64, 8 bytes)."""
    result = runs[0]["Muon/ddp/split"]
    mine = sum(NUMEL[m] for m, (owner, _) in result["ownership"].items() if owner == 0)
    others = sum(NUMEL.values()) - mine
    assert result["comm_bytes_per_step"] == 8 * (mine + others)
    assert runs[0]["Muon/ddp/replicate"]["comm_bytes_per_step"] == 0


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["replicate", "split"])
@pytest.mark.parametrize(
    "setup", [f"{name}/fsdp" for name in PHASED] + [f"{name}/fsdp-units" for name in PHASED if name in UNITS]
)
def test_fsdp_momentum_is_sharded_on_every_rank(runs, setup: str, mode: str) -> None:
    """The phased methods under FSDP2: each rank's momentum (Muon's momentum_buffer, KL-Shampoo's exp_avg)
    has exactly its parameter shard's elements (uneven 4/3-row shards of the 7- and 5-row matrices), and
    the shards add up to the whole matrix."""
    sizes = [runs[rank][f"{setup}/{mode}"]["momentum_numel"] for rank in range(2)]
    for rank in range(2):
        assert set(sizes[rank]) == MATRICES
        for matrix, (buf, param) in sizes[rank].items():
            assert buf == param < NUMEL[matrix], f"{matrix} on rank {rank}: momentum {buf}, shard {param}"
    for matrix, whole in NUMEL.items():
        assert sizes[0][matrix][0] + sizes[1][matrix][0] == whole


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["replicate", "split"])
@pytest.mark.parametrize("name", PHASED)
def test_fsdp_phased_volume_matches_the_model(runs, name: str, mode: str) -> None:
    """Phased methods under FSDP2 (fp64, 8 bytes), with n the matrix's and l this rank's shard's elements: only
    the map's k inputs travel (Muon/HTMuon: U, k = 1; KL-Shampoo, Pro-KLShampoo: (M, G), k = 2, but G alone,
    k = 1, on the initialisation step), never the parameter. Replicate: send l of each input to the other
    rank, receive n - l. Split: the owner receives the other shard of each input (n - l) and sends back O
    (n - l, a zero update on the initialisation step); a non-owner sends l per input and receives l."""
    k = MAP_INPUTS[name]
    # inputs per matrix over the run: the KL methods' first step (initialisation) moves G only
    inputs = k * STEPS if k == 1 else k * STEPS - 1
    for rank in range(2):
        result = runs[rank][f"{name}/fsdp/{mode}"]
        total = 0
        for matrix, (local, _) in result["momentum_numel"].items():
            owner, _ = result["ownership"][matrix]
            if mode == "replicate":
                total += inputs * (local + (NUMEL[matrix] - local))
            else:
                total += (inputs + STEPS) * ((NUMEL[matrix] - local) if owner == rank else local)
        assert result["comm_bytes_per_step"] == 8 * total / STEPS


@pytest.mark.distributed
def test_nonfinite_gradient_on_one_shard_is_skipped_on_every_rank(runs) -> None:
    """FSDP2 split: only rank 1's shard of c.weight is NaN; the ranks agree to skip the whole matrix."""
    for rank in range(2):
        assert runs[rank]["nonfinite"]["unchanged"] == ["c.weight"]
    # counted once, by the owner of c.weight
    assert [runs[r]["nonfinite"]["skips"] for r in range(2)] in ([1, 0], [0, 1])


@pytest.mark.distributed
def test_other_dtensor_layouts(runs) -> None:
    """Column shards work in both modes; replicated DTensors in replicate mode; split refuses them."""
    from _dist_common import layout_problem, make_layout_optimizer

    weights, grads = layout_problem()
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = make_layout_optimizer(params)
    for step in range(3):
        for p, g in zip(params, grads, strict=True):
            p.grad = g * (step + 1)
        optimizer.step()
    for rank in range(2):
        layouts = runs[rank]["layouts"]
        for label in ("shard1-split", "shard1-replicate", "replicated-replicate"):
            for got, expected in zip(layouts[label], params, strict=True):
                assert _rel(got, expected.detach()) <= 1e-14, label
        assert "ValueError" in layouts["replicated-split"] and "replicate" in layouts["replicated-split"]


@pytest.mark.distributed
def test_other_dtensor_layouts_kl_shampoo(runs) -> None:
    """The same layouts for KL-Shampoo's (M, G) inputs: initialisation step, an update with a refresh, one more."""
    from _dist_common import layout_problem
    from _dist_worker import make_kl_layout_optimizer

    weights, grads = layout_problem()
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = make_kl_layout_optimizer(params)
    for step in range(3):
        for p, g in zip(params, grads, strict=True):
            p.grad = g * (step + 1)
        optimizer.step()
    assert all(not torch.equal(p.detach(), w) for p, w in zip(params, weights, strict=True))  # it moved
    for rank in range(2):
        layouts = runs[rank]["layouts-KLShampoo"]
        for label in ("shard1-split", "shard1-replicate", "replicated-replicate"):
            for got, expected in zip(layouts[label], params, strict=True):
                assert _rel(got, expected.detach()) <= 1e-14, label
        assert "ValueError" in layouts["replicated-split"] and "replicate" in layouts["replicated-split"]


# -- single-process units ----------------------------------------------------------------------------------
def test_checkpoint_restores_state_created_after_the_first_step(tmp_path) -> None:
    """HTMuon with interval=3 creates its stream basis only at step 3; torch's zero-gradient init
    step (step 1) would not create it, so a template from that step would drop it on load.
    load_checkpoint builds the template from the checkpoint metadata instead."""
    from whiten.optim import HTMuon

    def make(model):
        return HTMuon(model.parameters(), lr=0.05, spectral_map="stream", interval=3)

    x, y = make_data()
    straight = make_model()
    train(straight, make(straight), x, y, 2 * HALF)
    model = make_model()
    optimizer = make(model)
    train(model, optimizer, x, y, HALF)
    wd.save_checkpoint(tmp_path / "ckpt", model, optimizer)
    resumed = make_model()
    resumed_optimizer = make(resumed)
    wd.load_checkpoint(tmp_path / "ckpt", resumed, resumed_optimizer)
    assert any("stream_basis" in state for state in resumed_optimizer.state.values())
    assert resumed_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    train(resumed, resumed_optimizer, x, y, HALF)
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        # equal values, but the loaded basis is contiguous where the live one was a transposed view,
        # so later matmuls may round differently
        assert _rel(p.detach(), q.detach()) <= 1e-12


def test_checkpoint_load_keeps_the_loading_runs_mode(tmp_path) -> None:
    """The saved groups carry the saver's distributed_mode; loading must not switch this run's mode."""
    x, y = make_data()
    model = make_model()
    optimizer = make_optimizer("Muon", model, "replicate")
    train(model, optimizer, x, y, 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        wd.save_checkpoint(tmp_path / "ckpt", model, optimizer)
        resumed = make_model()
        resumed_optimizer = make_optimizer("Muon", resumed, "split")
        resumed_optimizer.param_groups[0]["lr"] = 123.0  # hyperparameters do come from the checkpoint
        wd.load_checkpoint(tmp_path / "ckpt", resumed, resumed_optimizer)
    assert [g["distributed_mode"] for g in resumed_optimizer.param_groups] == ["split", "split"]
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_owner_assignment_is_cached_until_the_split_parameters_change(monkeypatch) -> None:
    from whiten.optim.distributed import ownership

    world = [2]
    monkeypatch.setattr(ownership, "_initialized", lambda: True)
    monkeypatch.setattr(ownership, "process_group_of", lambda optimizer, params: None)
    monkeypatch.setattr(ownership.dist, "get_world_size", lambda group=None: world[0])
    costed = []

    def counted(optimizer, shape, group):
        costed.append(shape)
        return float(torch.Size(shape).numel())

    monkeypatch.setattr(ownership, "matrix_flops", counted)
    params = [torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(4, 4))]
    optimizer = Muon(params)
    optimizer.set_distributed_mode("split")
    group = optimizer.param_groups[0]
    first = wd.owners_of(optimizer, group)
    assert first == {id(params[0]): 0, id(params[1]): 1} and len(costed) == 2
    assert wd.owners_of(optimizer, group) is first and len(costed) == 2  # hit: nothing re-costed

    params[1].data = torch.zeros(16, 16)  # same parameter, new size: the largest is now params[1]
    resized = wd.owners_of(optimizer, group)
    assert resized == {id(params[0]): 1, id(params[1]): 0} and costed[-2:] == [(8, 8), (16, 16)]
    extra = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer.add_param_group({"params": [extra]})  # the defaults' mode: split
    assert id(extra) in wd.owners_of(optimizer, group) and len(costed) == 7
    assert id(extra) in wd.owners_of(optimizer, optimizer.param_groups[1]) and len(costed) == 7
    world[0] = 3
    assert sorted(wd.owners_of(optimizer, group).values()) == [0, 1, 2] and len(costed) == 10
    optimizer.param_groups[1]["distributed_mode"] = "replicate"  # the other group leaves the split
    assert set(wd.owners_of(optimizer, group)) == {id(params[0]), id(params[1])} and len(costed) == 12


def test_assign_owners_is_greedy_largest_first() -> None:
    assert wd.assign_owners([10.0, 6.0, 5.0, 4.0], 2) == [0, 1, 1, 0]
    costs = [100.0, 1.0, 1.0, 1.0, 1.0]
    owners = wd.assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert sorted(loads) == [4.0, 100.0]  # balance by cost, not count: 1 matrix vs 4
    assert wd.assign_owners([], 3) == []
    assert wd.assign_owners([1.0] * 5, 8) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="world_size"):
        wd.assign_owners([1.0], 0)


def test_assign_owners_makespan_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    costs = (torch.rand(40, generator=gen) ** 3 * 1000).tolist()
    for world in (2, 3, 8):
        owners = wd.assign_owners(costs, world)
        loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world)]
        lower = max(max(costs), sum(costs) / world)  # no assignment beats this
        assert max(loads) <= 4 / 3 * lower + 1e-9


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matrix_flops_grow_with_size(name: str) -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = make_optimizer(name, model)
    group = optimizer.param_groups[0]
    small, large = wd.matrix_flops(optimizer, (64, 64), group), wd.matrix_flops(optimizer, (128, 256), group)
    assert 0 < small < large
    # a cubic method: doubling both sides costs ~8x
    assert 4 < wd.matrix_flops(optimizer, (128, 128), group) / small <= 8.5


def test_kronecker_flops_follow_the_methods() -> None:
    """The assignment's costs rank the methods as their math does (the exact counts: tests/test_flops.py)."""
    from whiten.optim import KLSOAP, KLShampoo, ProKLShampoo

    def flops(cls, shape, **kwargs):
        optimizer = cls(torch.nn.Linear(4, 4).parameters(), lr=1e-3, **kwargs)
        return wd.matrix_flops(optimizer, shape, optimizer.param_groups[0])

    shape = (768, 3072)
    # KL-SOAP: KL-Shampoo's factors and refreshes, plus its momentum rotated at every refresh, minus the two
    # statistics products it takes from its rotation of G: within 20% of KL-Shampoo, below it at this shape
    assert 0.8 * flops(KLShampoo, shape) < flops(KLSOAP, shape) < flops(KLShampoo, shape)
    # Pro-KL's O(m^2 n + m n r) + NS work is below KL-Shampoo's O(m^2 n + m n^2)
    assert flops(ProKLShampoo, shape, rank=128) < 0.7 * flops(KLShampoo, shape)
    # refreshing the bases less often costs less
    assert flops(KLShampoo, shape, precondition_frequency=100) < flops(KLShampoo, shape, precondition_frequency=1)


def test_distributed_mode_option_is_validated() -> None:
    with pytest.raises(ValueError, match="distributed_mode"):
        Muon([{"params": torch.nn.Linear(3, 3).parameters(), "distributed_mode": "shard"}])
    optimizer = Muon(torch.nn.Linear(3, 3).parameters())
    with pytest.raises(ValueError, match="distributed_mode"):
        optimizer.set_distributed_mode("everything")
    optimizer.set_distributed_mode("split")
    assert all(g["distributed_mode"] == "split" for g in optimizer.param_groups)
    assert optimizer.state_dict()["param_groups"][0]["distributed_mode"] == "split"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_split_mode_without_process_group_is_the_plain_step(name: str) -> None:
    x, y = make_data()
    results = []
    for mode in ("replicate", "split"):
        model = make_model()
        optimizer = make_optimizer(name, model, mode)
        train(model, optimizer, x, y, 3)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_relaunch_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["whiten", "bench", "--nproc", "2", "--steps", "3", "--nproc=4", "--out", "x"]
    assert wl.without_flag(argv, "--nproc") == ["whiten", "bench", "--steps", "3", "--out", "x"]
    calls = []
    monkeypatch.setattr(wl, "launch", lambda n, a: calls.append((n, a)) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert wl.relaunch(1, argv) is None and calls == []
    assert wl.relaunch(2, argv) == 0
    assert calls == [(2, ["whiten", "bench", "--steps", "3", "--out", "x"])]
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside a launched process: run, do not launch again
    assert wl.relaunch(2, argv) is None and len(calls) == 1
    with pytest.raises(ValueError, match="--nproc"):
        wl.relaunch(0, argv)


def test_single_process_helpers() -> None:
    batch = torch.arange(6)
    assert torch.equal(wl.rank_slice(batch), batch)
    assert wl.is_main_process()


def test_launch_checks_nproc() -> None:
    with pytest.raises(ValueError, match="nproc"):
        wl.launch(0, ["whiten"])


def test_launch_command_needs_no_fixed_port() -> None:
    cmd = wl.launch_command(3, ["pkg.mod", "--x"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=3" in cmd and "--rdzv-endpoint=127.0.0.1:0" in cmd and "--local-addr=127.0.0.1" in cmd
    assert not any(part.startswith("--master-port") for part in cmd)  # port 0: torchrun binds a free one
    assert cmd[-3:] == ["-m", "pkg.mod", "--x"]
    assert wl.launch_command(1, ["script.py"], module=False)[-1] == "script.py"


def test_run_with_timeout_stops_a_hung_command() -> None:
    import time

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"0\.5 s"):
        wl.run_with_timeout([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.5)
    assert time.monotonic() - start < 30  # stopped, not waited for
    assert wl.run_with_timeout([sys.executable, "-c", "raise SystemExit(3)"], timeout_s=30) == 3


def test_init_distributed_without_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rank, world, device = wl.init_distributed()
    assert (rank, world) == (0, 1) and isinstance(device, torch.device)
    assert wl.init_distributed(device="cpu") == (0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        wl.init_distributed(device="meta")


def test_init_distributed_checks_the_gpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """More processes than GPUs: a clear error before any CUDA call (mocked CUDA, so it runs on CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"local rank 1 has no GPU.*1 CUDA device"):
        wl.init_distributed()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        wl.init_distributed(device="cuda")


# -- whiten bench --nproc -----------------------------------------------------------------------------------
def test_bench_nproc_relaunches_itself(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import whiten.bench.cli as bench_cli
    from whiten.cli import main

    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(bench_cli, "relaunch", lambda n, argv: calls.append((n, argv)) or 0)
    argv = ["bench", "--nproc", "2", "--steps", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert calls == [(2, ["whiten", *argv])]  # relaunch drops --nproc before starting the processes
    assert main([*argv, "--resume"]) == 2  # one-line error: not supported


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_nproc_2_matches_one_process(tmp_path) -> None:
    """`whiten bench --nproc 2` (DDP, each process half of every batch) = the 1-process bench."""
    if not _gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    import json
    import subprocess

    from whiten.cli import main

    args = ["bench", "--steps", "3", "--optimizers", "muon", "--eval-batches", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "n1")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "whiten", *args, "--nproc", "2", "--out", str(tmp_path / "n2")],
        check=True,
        env=env,
        timeout=LAUNCH_TIMEOUT_S,
    )
    finals = [
        json.loads((tmp_path / n / "runs" / "muon-s0" / "result.json").read_text())["final_val_loss"]
        for n in ("n1", "n2")
    ]
    assert finals[0] == pytest.approx(finals[1], rel=1e-5)
