"""The training loop's own behaviour, on a tiny model and an in-memory loader."""
import pytest
import torch

from nanofast.checkpoint import latest_step
from nanofast.common import Dist
from nanofast.model import GPT, config_for_depth
from nanofast.optim import MuonAdamW
from nanofast.trainer import LoopSettings, NonFiniteLoss, train


def tiny():
    torch.manual_seed(0)
    model = GPT(config_for_depth(1, vocab_size=50, sequence_len=16, head_dim=64))
    model.init_weights()
    return model, MuonAdamW(model.param_groups())


def batches():
    """An endless stream of (x, y, state) batches of random tokens."""
    g = torch.Generator().manual_seed(1)
    i = 0
    while True:
        x = torch.randint(0, 50, (2, 16), generator=g)
        yield x, x, {"i": i}
        i += 1


class PoisonAfter(torch.nn.Module):
    """Wraps the model; its loss turns NaN from call `n` on (a diverging run)."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x, y):
        self.calls += 1
        loss = self.model(x, y)
        return loss * float("nan") if self.calls >= self.n else loss


def test_non_finite_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    model, opt = tiny()
    settings = LoopSettings(num_iterations=10, save_every=2, eval_every=0, log_every=0, tokens_per_step=32)
    with pytest.raises(NonFiniteLoss) as e:
        train(model, opt, batches(), settings, tmp_path, Dist(), {}, step_model=PoisonAfter(model, 5))
    message = str(e.value)
    assert "at step 5" in message and "model_000004.pt" in message and "\n" not in message
    assert latest_step(tmp_path) == 4  # nothing written after the bad step


def test_non_finite_loss_before_any_checkpoint(tmp_path):
    model, opt = tiny()
    settings = LoopSettings(num_iterations=3, eval_every=0, log_every=0)
    with pytest.raises(NonFiniteLoss, match="at step 1: stopped; last good checkpoint: none in"):
        train(model, opt, batches(), settings, tmp_path, Dist(), {}, step_model=PoisonAfter(model, 1))


def test_loop_records_losses_and_saves_the_end(tmp_path):
    model, opt = tiny()
    settings = LoopSettings(num_iterations=4, eval_every=2, log_every=0, tokens_per_step=32)
    state = train(model, opt, batches(), settings, tmp_path, Dist(), {}, evaluate=lambda: {"score": 1.0})
    assert [s for s, _ in state.losses] == [1, 2, 3, 4]
    assert [e["step"] for e in state.evals] == [0, 2, 4]
    assert latest_step(tmp_path) == 4 and len(state.tokens_per_second) == 4
