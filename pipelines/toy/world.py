"""The tiny world: images of coloured shapes with questions, captions and preference pairs.

Everything is drawn from one seed, so the same seed gives the same bytes (images included).
A scene holds 1-3 objects, one per colour, each in its own quadrant. Questions find an object by
where it is (colour, shape, existence: "Is there an object at top left?") or by its colour
(position). Training existence questions are half about a filled cell and half about an empty one
(with three in four "yes", teachers of some seeds learned the prior and said "yes" to every cell).
Objects co-occur with a fixed "partner" more often than chance and rejected captions add that
partner in an empty cell: a model that does not look says "yes" to an empty cell, which is the
hallucination the POPE-style evaluation (balanced yes/no) measures.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "position", "exists", "caption")


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    position: str

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def _all_kinds() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def partner_of(color: str, shape: str) -> tuple[str, str]:
    """The object that tends to appear together with (color, shape): a fixed derangement."""
    colors = list(COLORS)
    return colors[(colors.index(color) + 2) % len(colors)], SHAPES[(SHAPES.index(shape) + 3) % len(SHAPES)]


def sample_scene(rng: random.Random) -> list[WorldObject]:
    n = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample(POSITIONS, n)
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        if kinds and rng.random() < 0.6:
            cand = partner_of(*kinds[-1])
        else:
            cand = rng.choice(_all_kinds())
        if cand[0] not in {c for c, _ in kinds}:  # one object per colour: a colour names an object
            kinds.append(cand)
    return [WorldObject(shape=s, color=c, position=p) for (c, s), p in zip(kinds, cells)]


def draw_scene(objects: list[WorldObject], rng: random.Random) -> Image.Image:
    bg = tuple(235 + rng.randrange(16) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for obj in objects:
        col, row = POSITIONS.index(obj.position) % 2, POSITIONS.index(obj.position) // 2
        r = rng.randint(8, 12)
        cx = col * half + half // 2 + rng.randint(-3, 3)
        cy = row * half + half // 2 + rng.randint(-3, 3)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def caption(objects: list[WorldObject]) -> str:
    ordered = sorted(objects, key=lambda o: POSITIONS.index(o.position))
    parts = [f"a {o.name} at {o.position}" for o in ordered]
    return " and ".join(parts) + "."


def empty_cell(objects: list[WorldObject], rng: random.Random) -> str:
    """A position with nothing in it: three objects at most in four cells, so there is always one."""
    return rng.choice([p for p in POSITIONS if p not in {o.position for o in objects}])


def absent_object(objects: list[WorldObject], rng: random.Random, adversarial: bool) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in objects}
    if adversarial:
        for o in objects:
            cand = partner_of(o.color, o.shape)
            if cand not in present:
                return cand
    return rng.choice([k for k in _all_kinds() if k not in present])


def make_qa(objects: list[WorldObject], qtype: str, rng: random.Random, p_yes: float) -> tuple[str, str]:
    """One (question, answer) pair of the given type about the scene."""
    obj = rng.choice(objects)
    if qtype == "color":
        return f"What color is the object at {obj.position}?", obj.color
    if qtype == "shape":
        return f"What shape is the object at {obj.position}?", obj.shape
    if qtype == "count":
        return "How many objects are there?", COUNT_WORDS[len(objects)]
    if qtype == "position":
        return f"Where is the {obj.color} object?", obj.position
    if qtype == "exists":
        if rng.random() < p_yes:
            return f"Is there an object at {obj.position}?", "yes"
        return f"Is there an object at {empty_cell(objects, rng)}?", "no"
    if qtype == "caption":
        return "Describe the image.", caption(objects)
    raise ValueError(f"unknown question type {qtype!r}")


def hallucinated_caption(objects: list[WorldObject], rng: random.Random) -> str:
    color, shape = absent_object(objects, rng, adversarial=True)
    free = [p for p in POSITIONS if p not in {o.position for o in objects}]
    if free:
        return caption([*objects, WorldObject(shape=shape, color=color, position=rng.choice(free))])
    # No free cell: swap one object's colour for a wrong one.
    victim = rng.choice(objects)
    wrong = rng.choice([c for c in COLORS if c != victim.color])
    return caption([o if o is not victim else WorldObject(o.shape, wrong, o.position) for o in objects])


def make_pref(objects: list[WorldObject], rng: random.Random) -> tuple[str, str, str]:
    """(question, chosen, rejected) where the rejected answer is wrong about the picture: it
    hallucinates an absent object or attribute, or (for half the existence questions) denies a
    present object, so that preferring "no" blindly is not rewarded."""
    kind = rng.choice(("exists", "caption", "color"))
    if kind == "exists":
        if rng.random() < 0.5:
            return f"Is there an object at {rng.choice(objects).position}?", "yes", "no"
        return f"Is there an object at {empty_cell(objects, rng)}?", "no", "yes"
    if kind == "caption":
        return "Describe the image.", caption(objects), hallucinated_caption(objects, rng)
    q, a = make_qa(objects, "color", rng, p_yes=1.0)
    return q, a, rng.choice([c for c in COLORS if c != a])


def all_texts() -> list[str]:
    """Every word and phrase the world can say; the tiny tokenizer is trained on these."""
    rng = random.Random(0)
    texts = []
    for _ in range(400):
        objs = sample_scene(rng)
        for qtype in QUESTION_TYPES:
            texts.extend(make_qa(objs, qtype, rng, p_yes=0.5))
        texts.extend(make_pref(objs, rng))
    return texts


def make_world(out: Path, seed: int, n_mimic: int, n_pref: int, n_eval: int) -> dict[str, Path]:
    """Write images and mimic.jsonl, pref.jsonl, eval.jsonl under `out`; returns their paths."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {name: out / f"{name}.jsonl" for name in ("mimic", "pref", "eval")}

    def new_image(prefix: str, i: int) -> tuple[list[WorldObject], str]:
        objs = sample_scene(rng)
        rel = f"images/{prefix}-{i:06d}.png"
        draw_scene(objs, rng).save(out / rel, format="PNG")
        return objs, rel

    with open(paths["mimic"], "w") as f:
        for i in range(n_mimic):
            objs, rel = new_image("mimic", i)
            turns = []
            for t, qtype in enumerate(rng.sample(QUESTION_TYPES, rng.choice((1, 2, 2, 3)))):
                q, a = make_qa(objs, qtype, rng, p_yes=0.5)
                turns.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
                turns.append({"from": "gpt", "value": a})
            f.write(json.dumps({"id": f"mimic-{i:06d}", "image": rel, "conversations": turns}) + "\n")

    with open(paths["pref"], "w") as f:
        for i in range(n_pref):
            objs, rel = new_image("pref", i)
            q, chosen, rejected = make_pref(objs, rng)
            row = {"id": f"pref-{i:06d}", "image": rel, "question": q, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(row) + "\n")

    with open(paths["eval"], "w") as f:
        for i in range(n_eval):
            objs, rel = new_image("eval", i)
            # Half of the evaluation is POPE-style: balanced yes/no existence questions.
            if i % 2 == 0:
                qtype = "pope"
                q, a = make_qa(objs, "exists", rng, p_yes=1.0 if (i // 2) % 2 == 0 else 0.0)
            else:
                qtype = rng.choice(("color", "shape", "count", "position"))
                q, a = make_qa(objs, qtype, rng, p_yes=0.5)
            row = {"id": f"eval-{i:06d}", "image": rel, "question": q, "answer": a, "type": qtype}
            f.write(json.dumps(row) + "\n")
    return paths
