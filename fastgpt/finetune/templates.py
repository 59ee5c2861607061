"""Prompt templates for instruction-tuned models.

A fine-tuned model only follows instructions written the way it was trained on,
so the template's name travels with the model in `metadata["template"]` and
`fastgpt chat` reads it back. Each template turns (instruction, input) into a
prompt that ends exactly where the response begins; the model learns to write
the response and then <|endoftext|>.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import FastGPTError

# The metadata key under which a model records its prompt template.
METADATA_KEY = "template"


@dataclass(frozen=True)
class Template:
    name: str
    preamble: str          # text before the instruction
    instruction: str       # header before the instruction
    input: str             # header before the input (the section is left out when input is empty)
    response: str          # header that ends the prompt; the response follows it

    def prompt(self, instruction: str, input: str = "") -> str:
        text = self.preamble + self.instruction + instruction
        if input:
            text += self.input + input
        return text + self.response


TEMPLATES: dict[str, Template] = {
    # Stanford Alpaca's format.
    "alpaca": Template(
        name="alpaca",
        preamble="Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.",
        instruction="\n\n### Instruction:\n",
        input="\n\n### Input:\n",
        response="\n\n### Response:\n",
    ),
    # Phi-3's chat turns: the input, when present, follows the instruction in the user turn.
    "phi3": Template(
        name="phi3",
        preamble="",
        instruction="<|user|>\n",
        input="\n",
        response="\n<|assistant|>\n",
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise FastGPTError(f"unknown template {name!r} (choose from: {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def format_prompt(template_name: str, instruction: str, input: str = "") -> str:
    """The prompt for one request, ending where the model's response starts."""
    return get_template(template_name).prompt(instruction, input)


def extract_response(template_name: str, text: str, prompt: str | None = None) -> str:
    """The response part of a generated text.

    Rule: drop the prompt (the given one, or everything up to the template's first
    response header), then cut at the first <|endoftext|> or at any header of the
    template that the model starts writing on its own (a new turn), and strip spaces.
    """
    template = get_template(template_name)
    if prompt is not None and text.startswith(prompt):
        text = text[len(prompt):]
    elif template.response.strip() in text:
        text = text.split(template.response.strip(), 1)[1]
    headers = (template.instruction, template.input, template.response)
    for stop in ["<|endoftext|>", *(h.strip() for h in headers if h.strip())]:
        if stop in text:
            text = text[:text.index(stop)]
    return text.strip()
