"""ResNet-18 (11.2M parameters, torchvision's architecture) on all parameters: EK-FAC's cost.

    .venv/bin/python benchmarks/bench_resnet18.py [--n-train 2000] [--batch-size 64]

Every parameter (20 convolutions, 20 BatchNorms in inference mode, the head):
EK-FAC (empirical Fisher, damping 1e-3) fit, pairwise scores of 10 test
points against n_train, self-influence of every training point; torch
float32, synthetic 32 × 32 images, seeded weights and running statistics.
Prints seconds per phase and the process's peak RSS. The architecture is
the one ``tests/test_resnet_all_parameters.py`` checks at an eighth of this
width (parameter count equal to torchvision's resnet18).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_resnet_all_parameters import resnet

from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel
from influence_core.layerwise import coverage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = resnet(width=64, dtype=torch.float32)
    X = torch.randn(args.n_train + 10, 3, 32, 32)
    y = torch.randint(0, 10, (args.n_train + 10,))
    train, test = (X[10:], y[10:]), (X[:10], y[:10])
    model = InfluenceModel(
        net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=args.batch_size
    )
    kinds: dict[str, int] = {}
    for c in coverage(model).values():
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    plain = time.perf_counter()
    for batch in model.batches(train, args.batch_size):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(batch.inputs), batch.targets).backward()
    plain = time.perf_counter() - plain
    start = time.perf_counter()
    calculator = FirstOrderInfluenceCalculator(
        model, EKFACIHVP(damping=1e-3, fisher="empirical")
    ).fit(train)
    fitted = time.perf_counter()
    calculator.influence(test)
    scored = time.perf_counter()
    calculator.self_influence()
    done = time.perf_counter()
    print(
        f"ResNet-18, d = {model.num_parameters:,} (all parameters: {kinds}), torch float32, "
        f"{torch.get_num_threads()} threads, n_train = {args.n_train}, batch {args.batch_size}"
    )
    print()
    print("| phase | seconds |\n|---|---:|")
    print(f"| one plain forward + backward pass over the data | {plain:.1f} |")
    print(f"| EK-FAC fit (two passes, factor eigendecompositions) | {fitted - start:.1f} |")
    print(f"| pairwise scores, 10 test points | {scored - fitted:.1f} |")
    print(f"| self-influence of every training point | {done - scored:.1f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
