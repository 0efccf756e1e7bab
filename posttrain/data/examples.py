"""The unit of training data every loop and data module shares: token ids, where the response
starts, and (for conversations) which token ranges are trained. Imports nothing of posttrain."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Example:
    token_ids: list[int]  # prompt + response
    prompt_len: int  # response tokens start here
    # Conversations (data/conversation.py): the trained token ranges [start, end); None: all
    # tokens from prompt_len on.
    loss_spans: list[tuple[int, int]] | None = None
    # Per trained token, in order, values an objective reads (a teacher cache's top-K:
    # teacher_cache_reader.py): name -> [loss_tokens, ...] tensor; collate puts them at the loss positions.
    per_token: dict | None = None

    @property
    def loss_tokens(self) -> int:
        if self.loss_spans is not None:
            return sum(end - start for start, end in self.loss_spans)
        return len(self.token_ids) - self.prompt_len

    def __len__(self) -> int:
        return len(self.token_ids)
