"""Translation plug-ins of the reference node: ``echo`` (a marked placeholder) and ``apertium``.

``apertium`` is real offline machine translation by Debian's Apertium packages
(``apt-get install apertium apertium-eng-spa``): one ``apertium -u <mode>`` process per
call, ~0.1-0.2 s here. Its modes name languages with three-letter codes (``eng-spa``);
the two-letter codes of the protocol are mapped by :data:`THREE_LETTER`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

import trio

from scheduler.node import JobFailed

TRANSLATORS = ("echo", "apertium")
THREE_LETTER = {
    "af": "afr", "an": "arg", "ar": "ara", "be": "bel", "bg": "bul", "br": "bre", "ca": "cat", "cs": "ces", "cy": "cym",
    "da": "dan", "de": "deu", "el": "ell", "en": "eng", "eo": "epo", "es": "spa", "et": "est", "eu": "eus", "fi": "fin",
    "fr": "fra", "ga": "gle", "gl": "glg", "he": "heb", "hi": "hin", "hr": "hbs", "id": "ind", "is": "isl", "it": "ita",
    "kk": "kaz", "mk": "mkd", "ms": "zlm", "mt": "mlt", "nb": "nob", "nl": "nld", "nn": "nno", "no": "nor", "oc": "oci",
    "pl": "pol", "pt": "por", "ro": "ron", "ru": "rus", "sc": "srd", "sk": "slk", "sl": "slv", "sr": "hbs", "sv": "swe",
    "tr": "tur", "tt": "tat", "uk": "ukr", "ur": "urd",
}
APT_HINT = "apt-cache search --names-only ^apertium- lists every pair Debian packages"


class MissingTool(RuntimeError):
    """What the node needs is not installed; the message is the line that installs it."""


def translate_placeholder(source_text: str, src_lang: str, tgt_lang: str) -> str:
    """No MT: the "translation" is the source text re-tagged with the target language."""
    prefix = f"[{src_lang}] "
    body = source_text[len(prefix):] if source_text.startswith(prefix) else source_text
    return f"[{tgt_lang}] {body}"


def mode(src_lang: str, tgt_lang: str) -> str:
    """Apertium's mode for a pair: ``en``, ``es`` -> ``eng-spa`` (three-letter codes pass as they are)."""
    return f"{THREE_LETTER.get(src_lang, src_lang)}-{THREE_LETTER.get(tgt_lang, tgt_lang)}"


def command(binary: str, src_lang: str, tgt_lang: str) -> list[str]:
    """The command that translates stdin (``-u``: unknown words are left unmarked)."""
    return [binary, "-u", mode(src_lang, tgt_lang)]


class Echo:
    async def translate(self, text: str, src_lang: str, tgt_lang: str) -> str:
        return translate_placeholder(text, src_lang, tgt_lang)


class Apertium:
    def __init__(self, lang_pairs: Iterable[tuple[str, str]], concurrency: int, binary: str | None = None) -> None:
        pairs = [(s, t) for s, t in lang_pairs if s != t]
        self.binary = binary or shutil.which("apertium")
        if self.binary is None:
            packages = " ".join(sorted({f"apertium-{mode(s, t)}" for s, t in pairs}))
            raise MissingTool(f"--mt apertium needs Debian's Apertium: apt-get install apertium {packages}".strip())
        modes = installed_modes(self.binary)
        missing = sorted({mode(s, t) for s, t in pairs} - modes)
        if missing:
            packages = " ".join(f"apertium-{m}" for m in missing)
            raise MissingTool(f"apertium has no mode {', '.join(missing)}: apt-get install {packages} ({APT_HINT})")
        self._limiter = trio.CapacityLimiter(concurrency)

    async def translate(self, text: str, src_lang: str, tgt_lang: str) -> str:
        if src_lang == tgt_lang or not text.strip():
            return text
        async with self._limiter:
            done = await trio.run_process(command(self.binary, src_lang, tgt_lang), stdin=text.encode(),  # type: ignore[arg-type]
                                          capture_stdout=True, capture_stderr=True, check=False)
        if done.returncode != 0:
            raise JobFailed(f"MT_FAILED: apertium exited with {done.returncode}")
        return done.stdout.decode(errors="replace").strip()


def installed_modes(binary: str) -> set[str]:
    """The modes ``apertium -l`` lists (``eng-spa``, ``spa-eng`` ...)."""
    listed = subprocess.run([binary, "-l"], capture_output=True, text=True, timeout=30, check=False).stdout
    return {line.strip() for line in listed.splitlines() if line.strip()}


def make_translator(name: str, lang_pairs: Iterable[tuple[str, str]], concurrency: int) -> Echo | Apertium:
    if name == "apertium":
        return Apertium(lang_pairs, concurrency)
    if name == "echo":
        return Echo()
    raise ValueError(f"unknown translator {name!r}; choose one of {TRANSLATORS}")
