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
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(WIDTH), torch.nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.up, self.down = torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.norm1(x)

        def heads(layer: torch.nn.Linear) -> torch.Tensor:
            return layer(h).reshape(b, T, HEADS, WIDTH // HEADS).transpose(1, 2)

        attended = torch.softmax(
            heads(self.q) @ heads(self.k).transpose(2, 3) / (WIDTH // HEADS) ** 0.5, dim=-1
        ) @ heads(self.v)
        x = x + self.o(attended.transpose(1, 2).reshape(b, T, WIDTH))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class Transformer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
        self.positions = torch.nn.Embedding(T, WIDTH)
        self.blocks = torch.nn.Sequential(*(Block() for _ in range(BLOCKS)))
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(T)[None])
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
