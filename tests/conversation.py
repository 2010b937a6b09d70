"""A tiny GPT that knows one six-turn conversation by heart, a calculator call in its second
answer: a model whose greedy answers are known in advance, so the chat CLI, the server and the web
page can be checked to hold the very same conversation, token for token."""
from __future__ import annotations

import torch

from nanofast.model import GPT, config_for_depth
from nanofast.tokenizer import Tokenizer

USER = ["Hello there", "What is 19 times 2?", "And plus 4?", "Is 42 even?", "Thanks!", "Bye"]
ANSWERS = [
    [{"type": "text", "text": "Hi! How can I help?"}],
    [{"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "19*2"},
     {"type": "python_output", "text": "38"}, {"type": "text", "text": " It is 38."}],
    [{"type": "text", "text": "That makes 42."}],
    [{"type": "text", "text": "Yes, 42 is even."}],
    [{"type": "text", "text": "You are welcome."}],
    [{"type": "text", "text": "Goodbye!"}],
]
CONTEXT = 512  # a quarter of it (an answer's default budget) holds every answer


def messages(turns: int = len(USER)) -> list[dict]:
    """The first `turns` exchanges as chat messages, answers as parts."""
    out = []
    for user, answer in zip(USER[:turns], ANSWERS[:turns]):
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out


def memorized_model(tokenizer: Tokenizer, steps: int = 300, seed: int = 0) -> GPT:
    """A 2-layer GPT trained on the whole conversation until it reproduces it. Every token is a
    target, the forced calculator result included, so the margins of the greedy choices are wide
    (the three paths batch their prompts differently; their rounding must not matter)."""
    torch.manual_seed(seed)
    ids, _ = tokenizer.render_conversation({"messages": messages()}, max_tokens=CONTEXT)
    model = GPT(config_for_depth(2, tokenizer.vocab_size, CONTEXT, aspect_ratio=32, head_dim=32))
    model.init_weights()
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
