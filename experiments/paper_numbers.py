"""The paper's own numbers (Games, Llama-7B), printed beside ours by experiments/reproduce.py.

Transcribed from the paper's text (/work/shared/paper/semantic-convergence.txt): Table 1's Games column and Tables
3-8. Rates are fractions (Table 5's collision rate 10.8% is 0.108); ``None`` is a dash in the paper.
"""

from __future__ import annotations

from typing import Any

FULL = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10")
FOUR = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")


def _paper(metrics: tuple[str, ...], rows: dict[str, tuple]) -> dict[str, dict[str, Any]]:
    return {label: dict(zip(metrics, values, strict=True)) for label, values in rows.items()}


OURS = (0.0858, 0.1274, 0.0591, 0.0724)
#: The paper's numbers on Games (Llama-7B), transcribed from /work/shared/paper/semantic-convergence.txt.
PAPER: dict[int, dict[str, dict[str, Any]]] = {
    1: _paper(
        FULL,
        {
            "SASRec": (0.0013, 0.0296, 0.0576, 0.0153, 0.0243),
            "BERT4Rec": (0.0136, 0.0468, 0.0773, 0.0302, 0.0400),
            "FMLP-Rec": (0.0154, 0.0496, 0.0806, 0.0325, 0.0424),
            "DCCF": (0.0197, 0.0578, 0.0882, 0.0389, 0.0486),
            "P5": (0.0158, 0.0495, 0.0789, 0.0329, 0.0423),
            "LC-Rec": (0.0279, 0.0755, 0.1167, 0.0518, 0.0651),
            "Ours": (0.0323, *OURS),
        },
    ),
    3: _paper(
        FOUR,
        {
            "ED": (0.0817, 0.1197, 0.0570, 0.0693),
            "w/o LA": (0.0836, 0.1264, 0.0586, 0.0723),
            "w/o NS": (0.0791, 0.1195, 0.0548, 0.0677),
            "Ours": OURS,
        },
    ),
    4: _paper(
        FOUR,
        {
            "1:0": (0.0791, 0.1195, 0.0548, 0.0677),
            "1:1": (0.0817, 0.1239, 0.0559, 0.0695),
            "1:2": (0.0830, 0.1256, 0.0574, 0.0711),
            "1:3": OURS,
            "1:4": (0.0871, 0.1277, 0.0606, 0.0737),
            "1:5": (0.0856, 0.1270, 0.0597, 0.0729),
        },
    ),
    5: _paper(
        ("cr", "tokens", *FOUR),
        {  # C=1: the paper prints "——" for the collision rate (one token per item)
            "1": (None, 16859, 0.0700, 0.1111, 0.0470, 0.0602),
            "2": (0.108, 512, 0.0789, 0.1198, 0.0537, 0.0668),
            "3": (0.0005, 768, 0.0804, 0.1225, 0.0555, 0.0690),
            "4": (0.0, 1024, *OURS),
            "5": (0.0, 1280, 0.0804, 0.1215, 0.0554, 0.0687),
        },
    ),
    6: _paper(
        FOUR,
        {
            "Llama-7B": OURS,
            "Llama-2-7B": (0.0817, 0.1242, 0.0562, 0.0699),
            "Llama-13B": (0.0910, 0.1329, 0.0636, 0.0771),
        },
    ),
    7: _paper(
        FOUR, {"2-layer": (0.0721, 0.1152, 0.0475, 0.0614), "3-layer": (0.0747, 0.1168, 0.0501, 0.0636), "Ours": OURS}
    ),
    8: _paper(
        FOUR,
        {
            "DCCF": (0.0578, 0.0882, 0.0389, 0.0486),
            "P5": (0.0495, 0.0789, 0.0329, 0.0423),
            "LC-Rec": (0.0708, 0.1044, 0.0494, 0.0602),
            "Ours": (0.0773, 0.1132, 0.0537, 0.0652),
            "Ours w/ T": OURS,
        },
    ),
}
