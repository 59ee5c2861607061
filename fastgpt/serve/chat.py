"""Chat messages -> one prompt, written the way the model was fine-tuned to read it.

An instruction-tuned model knows only its template (Alpaca's "### Instruction: ...
### Response:" for `fastgpt finetune instruct`), whose name the model keeps in its
metadata. The conversation is laid out exactly as `fastgpt chat` lays it out, so a
client gets the same answers as the terminal: each user turn goes through the
template, each assistant turn is followed by <|endoftext|>. A system (or developer)
message replaces the template's preamble, which is what that preamble is. Template
headers become stop strings: a model that starts a new turn on its own has finished.
A model without a template has no chat format, and the client is told so.
"""
from __future__ import annotations

from dataclasses import replace

from ..finetune.templates import Template
from .protocol import APIError, Message

END_OF_TURN = "<|endoftext|>"


def chat_prompt(template: Template | None, messages: list[Message]) -> tuple[str, list[str]]:
    """(prompt text, stop strings) for a conversation that ends with a user turn."""
    if template is None:
        raise APIError(400, "this model has no chat template (its metadata names none), so it cannot chat: "
                            "use /v1/completions, or serve it with --template alpaca|phi3", param="messages",
                       code="no_chat_template")
    if not messages:
        raise APIError(400, "messages: the list is empty", param="messages")
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer"))
    if system:
        template = replace(template, preamble=system)
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if not turns or turns[-1].role != "user":
        raise APIError(400, "messages: the last message must be from the user", param="messages")
    prompt, pending_user = "", []
    for message in turns:
        if message.role == "user":
            pending_user.append(message.text())
            continue
        if pending_user:
            prompt += template.prompt("\n\n".join(pending_user))
            pending_user = []
        prompt += message.text() + END_OF_TURN
    prompt += template.prompt("\n\n".join(pending_user))
    stops = [h.strip() for h in (template.instruction, template.response) if h.strip()]
    return prompt, stops
