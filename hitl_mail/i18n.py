"""The languages emails are written in: gettext catalogues under `hitl_mail/locale/`.

English is the source language (the wording in compose.py). Every other
language is a `locale/<code>/LC_MESSAGES/hitl_mail.po` catalogue, read with
Babel when first needed and kept for the process's life. Catalogues ship as
`.po` only: nothing compiled can fall out of date with its source. An entry
still marked fuzzy, or left empty, falls back to English.

To add a language: `pybabel init -i hitl_mail/locale/hitl_mail.pot -d
hitl_mail/locale -D hitl_mail -l <code>`, translate, done (README, "Languages").
"""

from __future__ import annotations

import gettext
from functools import cache
from importlib import resources
from io import BytesIO

from babel import Locale, UnknownLocaleError
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

SOURCE = "en"
DOMAIN = "hitl_mail"


def _locale_dir() -> resources.abc.Traversable:
    return resources.files("hitl_mail").joinpath("locale")


@cache
def languages() -> frozenset[str]:
    """The languages emails can be written in: English and every shipped catalogue."""
    found = {SOURCE}
    for entry in _locale_dir().iterdir():
        if entry.joinpath("LC_MESSAGES", f"{DOMAIN}.po").is_file():
            found.add(entry.name)
    return frozenset(found)


@cache
def translations(language: str) -> gettext.NullTranslations:
    """The catalogue for `language` (a code from `languages()`); English for any other."""
    if language == SOURCE or language not in languages():
        return gettext.NullTranslations()
    po = _locale_dir().joinpath(language, "LC_MESSAGES", f"{DOMAIN}.po")
    with po.open("rb") as source:
        catalog = read_po(source, locale=language, domain=DOMAIN)
    compiled = BytesIO()
    write_mo(compiled, catalog)  # fuzzy entries are left out, as msgfmt does
    compiled.seek(0)
    return gettext.GNUTranslations(compiled)


@cache
def locale(language: str) -> Locale:
    """Babel's locale for dates and durations; English when Babel does not know the code."""
    try:
        return Locale.parse(language.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return Locale.parse(SOURCE)
