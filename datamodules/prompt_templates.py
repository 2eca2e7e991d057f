"""Prompt wording of the alignment tasks (instruction templates inside LC-Rec's Alpaca frame).

Every prompt is ``FRAME.format(instruction=...)``; the response (item codes or text, then EOS) follows
``### Response:`` directly. Template ``0`` of the sequential task is LC-Rec's evaluation instruction and is
the only one used at evaluation; training draws uniformly from each task's templates (re-drawn every epoch)
so the model does not overfit one phrasing. Negative-behaviour prompts ask for an item the user is *unlikely*
to interact with: the wording, not the history, tells them apart from the sequential prompts.
"""

from __future__ import annotations

from datamodules.text import clean_text  # noqa: F401 (re-exported: the prompts clean item text with it)

FRAME = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)

SEQUENTIAL = (
    # LC-Rec's evaluation instruction: keep it first and verbatim.
    "The user has interacted with items {history} in chronological order. Can you predict the next possible "
    "item that the user may expect?",
    "Here is the item interaction history of the user: {history}. What to recommend to the user next?",
    "Given the user's historical interactive items arranged in chronological order: {history}, can you "
    "recommend a suitable item for the user?",
    "Based on the items the user has interacted with, {history}, can you determine which item the user will "
    "interact with next?",
)

NEGATIVE = (
    "The user has interacted with items {history} in chronological order. Can you name an item that the user "
    "is unlikely to interact with?",
    "Here is the item interaction history of the user: {history}. Which item would the user probably not be "
    "interested in?",
    "Given the user's historical interactive items arranged in chronological order: {history}, recommend an "
    "item that does not match the user's interests.",
)

CODE_TO_TITLE = (
    "An item is called {item}. Can you tell me the title of this item?",
    "What is the title of item {item}?",
)
CODE_TO_DESCRIPTION = (
    "Please describe item {item}.",
    "An item is called {item}. Can you give a short description of it?",
)
TITLE_TO_CODE = (
    'Which item has the title: "{title}"?',
    'An item has the title "{title}". Can you tell me which item it is?',
)
DESCRIPTION_TO_CODE = (
    'An item can be described as follows: "{description}". Which item is it describing?',
    'Which item matches this description: "{description}"?',
)
QUERY = (
    'Here is a query from a user: "{query}". Which item matches the query?',
    'A user wrote: "{query}". Can you recommend the item the user is looking for?',
)

#: Text-alignment sub-tasks, in the order of ``TEXT_KINDS`` ids: (template set, field in the prompt, response field).
TEXT_KINDS = (
    (CODE_TO_TITLE, None, "title"),
    (CODE_TO_DESCRIPTION, None, "description"),
    (TITLE_TO_CODE, "title", None),
    (DESCRIPTION_TO_CODE, "description", None),
)

HISTORY_SEPARATOR = ", "

#: Templates are drawn as ``rng.integers(TEMPLATE_DRAW) % len(templates)``: 12 is divisible by every set size (2, 3, 4).
TEMPLATE_DRAW = 12


def frame(instruction: str) -> str:
    """The full prompt (everything before the response) for one instruction."""
    return FRAME.format(instruction=instruction)


def eval_prompt(history: str) -> str:
    """The evaluation prompt: exactly LC-Rec's sequential-recommendation prompt."""
    return frame(SEQUENTIAL[0].format(history=history))
