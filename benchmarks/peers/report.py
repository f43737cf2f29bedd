"""Turn the runners' records into ``benchmarks/RESULTS.md`` and ``benchmarks/peers.png`` (project venv).

For each workload: every library's median wall time and peak memory, our time
as a ratio to it (same framework), and how well its scores agree with ours.
Agreement is the Pearson correlation over every score and the largest
difference relative to the largest score, max|a − b| / max|a|. Approximate
solvers are also compared with the exact scores of the same workload on the
last layer, so a peer that is consistently wrong shows it.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from common import (
    ARNOLDI_ITERATIONS,
    ARNOLDI_RANK,
    CG_ITERATIONS,
    CHECKPOINT_RATE,
    DAMPING,
    LISSA_DEPTH,
    LISSA_SCALE,
    PROFILES,
    RESULTS,
    TOP_K,
    WORKLOADS,
)

OURS = "influence_core"
BENCHMARKS = Path(__file__).resolve().parents[1]
REPORT = BENCHMARKS / "RESULTS.md"
PLOT = BENCHMARKS / "peers.png"
FRAMEWORK = {"torch": "PyTorch", "tensorflow": "TensorFlow"}

SIGNS = """\
**One sign and scale.** Every row is converted to influence_core's convention before it is
compared: score(z_train, z_test) = g_testᵀ (H + λI)⁻¹ g_train with H the Hessian of the *mean*
training loss, > 0 for a proponent. dattri, pyDVL and Influenciae report that already. captum's
Hessian is the sum of its per-batch loss Hessians: it runs with a summed loss (so its H is n·H),
`hessian_reg = n·λ`, and its scores are multiplied by n. dattri's inverse-Hessian attributors sum
one inverse per batch of the data given to `cache()` (Σ_b (H_b + λI)⁻¹), so they get the training
set as one batch; its TracIn projects gradients randomly even when told not to (its default
projector settings replace `None`), so the projector is unset after construction. LiSSA runs on
the full batch in every library, so all compute the same recursion
x ← v + (I − (H + λI)/s) x (dattri's and Influenciae's damping d = λ/s gives exactly that)."""


def _ratio(ours_s: float, theirs_s: float) -> str:
    """Our time over theirs: two decimals, or two significant digits when far below 1."""
    ratio = ours_s / theirs_s
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def load_records() -> dict[str, list[dict]]:
    by_workload: dict[str, list[dict]] = {w: [] for w in WORKLOADS}
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        record["stem"] = path.stem
        by_workload.setdefault(record["workload"], []).append(record)
    return by_workload


def scores(record: dict, name: str) -> np.ndarray | None:
    """A stored result; per-sample gradients as their Gram matrix G·Gᵀ (parameter order differs)."""
    path = RESULTS / f"{record['stem']}__{name}.npy"
    if not path.exists():
        return None
    found = np.load(path)
    return found @ found.T if name == "grads" else found


def agreement(a: np.ndarray | None, b: np.ndarray | None) -> str:
    if a is None or b is None:
        return "–"
    if a.shape != b.shape:
        return f"shape {b.shape} vs {a.shape}"
    a, b = a.ravel(), b.ravel()
    pearson = (
        np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else float(np.array_equal(a, b))
    )
    return f"{pearson:.6f} / {np.abs(a - b).max() / np.abs(a).max():.1e}"


def main_quantity(workload: str) -> str:
    return {"grads": "grads", "topk": "topk"}.get(workload.split("_")[0], "scores")


def ours_for(records: list[dict], backend: str) -> dict | None:
    for record in records:
        if record["library"] == OURS and record["backend"] == backend and "failed" not in record:
            return record
    return None


def table(workload: str, records: list[dict], exact: dict[str, dict]) -> list[str]:
    quantity = main_quantity(workload)
    approximate = workload.split("_")[0] in ("cg", "lissa", "arnoldi")
    header = [
        "library",
        "framework",
        "median",
        "runs",
        "peak memory",
        "ours ÷ this",
        "agreement with ours (" + ("G·Gᵀ" if quantity == "grads" else quantity) + ")",
        "self-influence agreement",
    ]
    if approximate:
        header.append("Pearson vs exact")
    header.append("note")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {OURS: 0, "limit": 1}
    for record in sorted(
        records,
        key=lambda r: (
            list(FRAMEWORK).index(r["backend"]),
            order.get(r["library"], 2),
            r["library"],
        ),
    ):
        backend = record["backend"]
        if "failed" in record:
            cells = [record["library"], FRAMEWORK[backend], "failed", "", "", "", "", ""]
            cells += [""] if approximate else []
            lines.append("| " + " | ".join([*cells, record["failed"].replace("|", "/")]) + " |")
            continue
        ours = ours_for(records, backend)
        if record["library"] == OURS:  # ours against the other backend's ours
            other = ours_for(records, "torch" if backend == "tensorflow" else "tensorflow")
            reference, ratio = other, "1"
        else:
            reference = ours
            ratio = _ratio(ours["median_s"], record["median_s"]) if ours else "–"
        agree = agreement(*(scores(x, quantity) if x else None for x in (reference, record)))
        agree_self = agreement(*(scores(x, "self") if x else None for x in (reference, record)))
        if quantity == "topk" and reference is not None:
            same = scores(reference, "indices"), scores(record, "indices")
            if same[0] is not None and same[1] is not None:
                agree += f", same indices {np.mean(same[0] == same[1]):.0%}"
        cells = [
            record["library"],
            FRAMEWORK[backend],
            _ms(record["median_s"]),
            str(len(record["times"])),
            f"{record['peak_mb']:.0f} MB",
            ratio,
            agree,
            agree_self,
        ]
        if approximate:
            reference_exact = exact.get(backend)
            found = scores(record, "scores")
            ex = scores(reference_exact, "scores") if reference_exact else None
            cells.append(
                f"{np.corrcoef(ex.ravel(), found.ravel())[0, 1]:.4f}"
                if ex is not None and found is not None
                else "–"
            )
        cells.append(record.get("note", ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def ours_and_finished(by_workload: dict[str, list[dict]]) -> Iterator[tuple[str, str, dict, list]]:
    """(workload, backend, our record, every finished record on that backend) where ours ran."""
    for workload, records in by_workload.items():
        for backend in FRAMEWORK:
            ours = ours_for(records, backend)
            if ours is not None:
                done = [r for r in records if r["backend"] == backend and "failed" not in r]
                yield workload, backend, ours, done


def targets(by_workload: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| workload | framework | ours | fastest peer | ours ÷ fastest peer | limit | ours ÷ limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload, backend, ours, done in ours_and_finished(by_workload):
        peers = [r for r in done if r["library"] not in (OURS, "limit")]
        limit = next((r for r in done if r["library"] == "limit"), None)
        fastest = min(peers, key=lambda r: r["median_s"]) if peers else None
        lines.append(
            "| "
            + " | ".join(
                [
                    workload,
                    FRAMEWORK[backend],
                    _ms(ours["median_s"]),
                    f"{fastest['library']} {_ms(fastest['median_s'])}" if fastest else "no peer",
                    _ratio(ours["median_s"], fastest["median_s"]) if fastest else "–",
                    _ms(limit["median_s"]) if limit else "–",
                    _ratio(ours["median_s"], limit["median_s"]) if limit else "–",
                ]
            )
            + " |"
        )
    return lines


#: What the profiles (``profile_close_calls.py``) show, for the targets missed in some runs.
WHY_SLOWER: dict[tuple[str, str], str] = {
    ("exact_last", "torch"): (
        "Our Hessian is assembled from ⌈n/256⌉·⌈d/256⌉ = 10 calls of the batched HVP kernel "
        "(batches of 256, column blocks of 256); pyDVL makes one `torch.func.hessian` call over "
        "the whole training set. The first profile below times both ways, and ours with one "
        "batch and one block: the differences are of the size of this machine's run-to-run "
        "noise. The defaults stay, because they bound memory on conv nets (the HVP vmap holds "
        "columns × batch × activations)."
    ),
    ("topk_last", "torch"): "As `exact_last`: the Hessian's HVP calls.",
    ("tracin_all", "tensorflow"): (
        "The second profile below: the test × train float64 matmuls dominate each checkpoint, "
        "in ours and in the limit alike (both transpose the training gradients explicitly; "
        "`tf.linalg.matmul(..., transpose_b=True)` is faster, but the Array API has no "
        "transposed product to map it to); ours also loads each checkpoint into the Keras "
        "variables."
    ),
    ("tracin_conv", "tensorflow"): "As `tracin_all`, on the conv net.",
}

#: A target missed: slower than the fastest peer, or more than this times the limit.
LIMIT_TARGET = 1.5


def misses(by_workload: dict[str, list[dict]]) -> list[str]:
    """Every (workload, framework) where ours misses a target, with what its profile shows."""
    lines = []
    for workload, backend, ours, done in ours_and_finished(by_workload):
        missed = [
            f"{_ratio(ours['median_s'], r['median_s'])}x the time of {r['library']}"
            for r in done
            if r["library"] not in (OURS, "limit") and ours["median_s"] > r["median_s"]
        ]
        missed += [
            f"{_ratio(ours['median_s'], r['median_s'])}x the limit"
            for r in done
            if r["library"] == "limit" and ours["median_s"] > LIMIT_TARGET * r["median_s"]
        ]
        if missed:
            why = WHY_SLOWER.get((workload, backend), "Not profiled.")
            lines.append(f"- **{workload}, {FRAMEWORK[backend]}**: {'; '.join(missed)}. {why}")
    return lines or ["- none in this run."]


def plot(by_workload: dict[str, list[dict]]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w, records in by_workload.items() if records]
    fig, axes = plt.subplots(
        len(workloads), 1, figsize=(8, 1.2 + 0.45 * sum(len(by_workload[w]) for w in workloads))
    )
    for ax, workload in zip(np.atleast_1d(axes), workloads, strict=True):
        records = [r for r in by_workload[workload] if "failed" not in r]
        records.sort(key=lambda r: r["median_s"])
        labels = [f"{r['library']} ({FRAMEWORK[r['backend']]})" for r in records]
        colours = [
            "tab:green"
            if r["library"] == OURS
            else "tab:gray"
            if r["library"] == "limit"
            else "tab:blue"
            for r in records
        ]
        ax.barh(labels, [r["median_s"] for r in records], color=colours)
        ax.set_xscale("log")
        times = [r["median_s"] for r in records]
        if max(times) > 10 * min(times):  # a decade's label is there; minor ones would overlap
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.invert_yaxis()
        ax.set_title(f"{workload}: {WORKLOADS[workload][0]}", fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    np.atleast_1d(axes)[-1].set_xlabel(
        "median wall time (s, log scale); green: influence_core, grey: limit"
    )
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)


def main() -> None:
    by_workload = load_records()
    exact = {b: ours_for(by_workload.get("exact_last", []), b) for b in FRAMEWORK}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        "# influence_core against the peer libraries",
        "",
        "Written by `make bench-peers` (`benchmarks/peers/run_all.py`, then `report.py`); numbers from one run on "
        f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, no GPU, Python {platform.python_version()}.",
        "Each library runs each workload in its own process (peak memory = that process's maximum resident set, "
        "interpreter and framework included); the median is over repeated calls after one warm-up call "
        "(a warm-up over 30 s is the only measurement).",
        "",
        "**Setup.** sklearn digits, 1200 training and 100 test points; an MLP 64-32-10 with tanh, trained once, "
        "the same weights loaded into every library; float64 unless a note says otherwise. "
        "*last* = the last layer (d = 330), *all* = every parameter (d = 2410). "
        f"Damping λ = {DAMPING}; CG {CG_ITERATIONS} iterations; LiSSA full batch, depth {LISSA_DEPTH}, "
        f"scale {LISSA_SCALE}; Arnoldi rank {ARNOLDI_RANK} from {ARNOLDI_ITERATIONS} iterations; "
        f"TracInCP over 5 checkpoints with rate {CHECKPOINT_RATE}; top-{TOP_K} proponents. "
        "Where a workload asks for scores and self-influence, influence_core makes one "
        "`influence_and_self_influence` call (one pass of training gradients for both) and the "
        "limit rows one pass by hand; the peers have no such call and make two.",
        "",
        SIGNS,
        "",
        "**Columns.** *ours ÷ this*: influence_core's median time on the same framework divided by this row's "
        "(below 1: ours is faster). *agreement*: Pearson / max|ours − this| ÷ max|ours| (for influence_core's "
        "own rows: against the other framework). *Pearson vs exact*: against the exact scores of `exact_last`.",
        "",
        "## Targets at a glance",
        "",
        *targets(by_workload),
        "",
        "## Where we are slower, and why",
        "",
        f"Every workload where ours is slower than a peer on the same framework, or more than "
        f"{LIMIT_TARGET}x the limit, in this run:",
        "",
        *misses(by_workload),
        "",
    ]
    if PROFILES.exists():
        lines += [
            "Profiles of the closest calls, where ours has missed a target in other runs on this "
            "machine (`profile_close_calls.py`, run after the workloads; every candidate timed in "
            "turn in each round, so machine noise hits them alike):",
            "",
            PROFILES.read_text().rstrip(),
            "",
        ]
    for workload, records in by_workload.items():
        if records:
            lines += [
                f"## {workload}: {WORKLOADS[workload][0]}",
                "",
                *table(workload, records, exact),
                "",
            ]
    scaling = RESULTS / "scaling.md"
    if scaling.exists():
        lines += [scaling.read_text().rstrip(), ""]
    lines += ["![median times per workload](peers.png)", ""]
    REPORT.write_text("\n".join(lines))
    plot(by_workload)
    print(f"wrote {REPORT} and {PLOT}")


if __name__ == "__main__":
    main()
