"""Prompt wording of LC-Rec's instruction-tuning tasks (Zheng et al. 2023), for the ``lcrec`` task preset.

A handful of templates per task, taken from the public code's ``prompt.py`` (github.com/RUCAIBox/LC-Rec, also
zhengbw0324/LC-Rec), with the placeholders renamed to this project's (``{inters}`` -> ``{history}``,
``{inter_titles}`` -> ``{titles}``). They sit in the same Alpaca frame (:data:`datamodules.prompt_templates.FRAME`,
LC-Rec's ``sft_prompt``). Template ``0`` of ``SEQREC`` is LC-Rec's evaluation prompt (its ``test.py`` uses
``seqrec`` prompt 0) and is the paper preset's ``SEQUENTIAL[0]`` itself, so evaluation and serving prompts are the
same strings under both presets.

Tasks whose templates come in kinds (item <-> index, fusion) list two templates per kind, in the kind order of
``*_KINDS``; a sample's kind and template both come from one draw (see :mod:`datamodules.lcrec_tasks`).
"""

from __future__ import annotations

from datamodules.prompt_templates import SEQUENTIAL

# Task 1, sequential recommendation (prompt.py seqrec_prompt 0, 1, 5, 9): history codes -> next item's codes.
SEQREC = (
    SEQUENTIAL[0],
    "I find the user's historical interactive items: {history}, and I want to know what next item the user needs. "
    "Can you help me decide?",
    "Here is the item interaction history of the user: {history}, what to recommend to the user next?",
    "Given the user's historical interactive items arranged in chronological order: {history}, can you recommend a "
    "suitable item for the user?",
)

#: The item text a prompt or response of the item <-> index tasks holds, per kind (LC-Rec's three sub-blocks).
ITEM_KINDS = ("title", "description", "title_description")

# Task 2, item -> index (prompt.py item2index_prompt 0, 2 | 6, 7 | 12, 17): item text -> the item's codes.
ITEM2INDEX = (
    'Which item has the title: "{title}"?',
    'An item is called "{title}", could you please let me know which item it is?',
    'An item can be described as follows: "{description}". Which item is it describing?',
    'Can you tell me what item is described as "{description}"?',
    'An item is called "{title}" and described as "{description}", can you tell me which item it is?',
    'Based on the title: "{title}", and the description: "{description}", answer which item is this?',
)

# Task 3, index -> item (prompt.py index2item_prompt 0, 3 | 6, 7 | 12, 13): codes -> the item's text.
INDEX2ITEM = (
    "What is the title of item {item}?",
    "Can you provide the title of item {item}?",
    "Please provide a description of item {item}.",
    "Briefly describe item {item}.",
    "What is the title and description of item {item}?",
    "Can you provide the corresponding title and description for item {item}?",
)
#: index2item's response per kind (prompt.py: "{title}", "{description}", "{title}\n\n{description}").
INDEX2ITEM_RESPONSES = ("{title}", "{description}", "{title}\n\n{description}")

#: Fusion kinds: history codes -> next title, history codes -> next description, history titles -> next codes.
FUSION_KINDS = ("codes_to_title", "codes_to_description", "titles_to_codes")

# Task 4, fusion sequential recommendation (prompt.py fusionseqrec_prompt 0, 1 | 4, 5 | 8, 10).
FUSIONSEQREC = (
    "The user has sequentially interacted with items {history}. Can you recommend the next item for him? Tell me "
    "the title of the item?",
    "Based on the user's historical interactions: {history}, try to predict the title of the item that the user may "
    "need next.",
    "Please review the user's historical interactions: {history}, and describe what kind of item he still needs.",
    "Here is the item interaction history of the user: {history}, please tell me what features he expects from his "
    "next item.",
    "Given the title sequence of user historical interactive items: {titles}, can you recommend a suitable next item "
    "for the user?",
    "Considering the title sequence of user history interaction items: {titles}. What is the next recommendation "
    "for the user?",
)

# Task 5, item search (prompt.py itemsearch_prompt 6, 7, 9, 10): a query -> the item's codes. LC-Rec's prompts 0-5
# also need a GPT-written user preference or intention, which no dataset here has; the query-only ones remain.
ITEMSEARCH = (
    'Suppose you are a search engine, now a user searches that: "{query}", can you select an item to respond to the '
    "user's query?",
    "As a search engine, your task is to answer the user's query by generating a related item. The user's query is "
    'provided as "{query}". Please provide your generated item as your answer.',
    'You meet a user\'s query: "{query}". Please respond to this user by selecting an appropriate item.',
    "Your task is to recommend the best item that matches the user's query. Here is the search query of the user: "
    '"{query}", tell me the item you recommend.',
)

# Task 6, preference obtaining (prompt.py preferenceobtain_prompt) is not here: its response is a preference text
# that LC-Rec had GPT write for every user (data_process/get_llm_output.py); no dataset here has one, and a text
# made up from the history would teach the model our wording, not the user's preference.

#: LC-Rec's title cleaning (data.py): surrounding whitespace and sentence punctuation stripped.
TITLE_STRIP = ".!?,;:`"
