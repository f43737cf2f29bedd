"""The 5.2M-parameter transformer-style model of the benchmarks, torch only (imported by peers' venvs too).

Token table 8000 × 256 (2.05M), positional table 64 × 256, 4 pre-norm blocks
of 4-head attention (q, k, v, o as ``nn.Linear``) and a 256-1024-256 MLP,
LayerNorms, a 10-class head on the mean position: 5.2M parameters, 25
``nn.Linear`` layers holding 3.16M. :func:`seeded` builds the weights and
data every benchmark of it uses.
"""

from __future__ import annotations

import torch

VOCAB, WIDTH, T, BLOCKS, HEADS = 8000, 256, 64, 4, 4


class Block(torch.nn.Module):
    def __init__(self, width: int = WIDTH, length: int = T, heads: int = HEADS) -> None:
        super().__init__()
        self.width, self.length, self.n_heads = width, length, heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, width, length, heads_ = x.shape[0], self.width, self.length, self.n_heads
        h = self.norm1(x)

        def heads(layer: torch.nn.Linear) -> torch.Tensor:
            return layer(h).reshape(b, length, heads_, width // heads_).transpose(1, 2)

        attended = torch.softmax(
            heads(self.q) @ heads(self.k).transpose(2, 3) / (width // heads_) ** 0.5, dim=-1
        ) @ heads(self.v)
        x = x + self.o(attended.transpose(1, 2).reshape(b, length, width))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class Transformer(torch.nn.Module):
    """The benchmarks' model at its default sizes; smaller ones (the defaults panel's) by argument."""

    def __init__(
        self,
        vocab: int = VOCAB,
        width: int = WIDTH,
        length: int = T,
        blocks: int = BLOCKS,
        heads: int = HEADS,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.length = length
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Embedding(length, width)
        self.blocks = torch.nn.Sequential(*(Block(width, length, heads) for _ in range(blocks)))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(self.length)[None])
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def seeded(n_train: int, n_test: int) -> tuple[Transformer, tuple, tuple]:
    """The seeded model (eval mode) and (ids, labels) for training and test, sequences of T tokens."""
    torch.manual_seed(0)
    net = Transformer().eval()
    ids = torch.randint(0, VOCAB, (n_train + n_test, T))
    y = torch.randint(0, 10, (n_train + n_test,))
    return net, (ids[n_test:], y[n_test:]), (ids[:n_test], y[:n_test])


def from_setup(setup) -> Transformer:
    """The model (eval mode) whose state a benchmark wrote as ``state.<name>`` arrays."""
    model = Transformer().eval()
    prefix = "state."
    model.load_state_dict(
        {k[len(prefix) :]: torch.from_numpy(setup[k]) for k in setup if k.startswith(prefix)}
    )
    return model
