"""AUTOMATIC1111's prompt styles: a `styles.csv` (header `name,prompt,negative_prompt`) or a folder of such CSVs,
and A1111's rules for applying them (its modules/styles.py `merge_prompts` / `apply_styles_to_prompt`).

Reading follows A1111's StyleDatabase: UTF-8 with or without a BOM, `csv.DictReader(skipinitialspace=True)`, rows
whose name starts with `#` are comments, the old `name,text` header is read as `name,prompt`, a missing
negative_prompt column is empty, and of two styles with one name the later one wins (A1111's dict; it keeps the
first one's place in the list). A folder is read as A1111 reads its styles folder: every `*.csv` in it (here in
sorted order, so a later file's style wins a name). Unlike A1111, which skips what it can't read with a log line,
a missing file, a CSV without a `name` or `prompt` column or one that is not UTF-8 CSV is a `StylesError` (one
line); rows with an empty name (a line of commas) are skipped.
"""
from __future__ import annotations

import csv
import os
from typing import NamedTuple

STYLES_ENV = "FASTSD_STYLES"


class StylesError(ValueError):
    """A styles file that can't be read (one line)."""


class PromptStyle(NamedTuple):
    name: str
    prompt: str
    negative_prompt: str


NO_STYLE = PromptStyle("None", "", "")  # A1111's StyleDatabase.no_style: what an unknown name gets


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A1111's rule: a style holding `{prompt}` takes the prompt there (every occurrence); otherwise the style is
    appended after ", ", each side stripped, and only the non-empty ones joined."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles_to_prompt(prompt: str, style_prompts: list[str]) -> str:
    """The style texts applied to the prompt in their order (each to the previous result)."""
    for style_prompt in style_prompts:
        prompt = merge_prompts(style_prompt, prompt)
    return prompt


def _csv_files(path: str, what: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(".csv") and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise StylesError(f"{what} {path}: a folder with no .csv file in it")
        return files
    if not os.path.exists(path):
        raise StylesError(f"{what} {path}: no such file")
    return [path]


def _read_csv(path: str, what: str, styles: dict[str, PromptStyle], where: dict[str, str], notes: list[str]) -> None:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            header = reader.fieldnames or []
            if "name" not in header:
                raise StylesError(f"{what} {path}: no 'name' column (A1111's styles.csv starts with the header "
                                  f"name,prompt,negative_prompt; this one: {','.join(header)[:80] or 'empty'})")
            text = "prompt" if "prompt" in header else "text" if "text" in header else None  # (A1111's old "text")
            if text is None:
                raise StylesError(f"{what} {path}: no 'prompt' column (A1111's header is name,prompt,negative_prompt)")
            for row in reader:
                name = row["name"] or ""
                if not name or name.startswith("#"):  # an empty row, or a comment (A1111 skips "#" rows)
                    continue
                line = f"{os.path.basename(path)} line {reader.line_num}"
                if name in styles:
                    notes.append(f"{what} {path}: style {name!r} is defined again at {line} (first at "
                                 f"{where[name]}); the later one wins, as in A1111")
                styles[name] = PromptStyle(name, row[text] or "", row.get("negative_prompt") or "")
                where[name] = line
    except OSError as e:
        raise StylesError(f"{what} {path}: can't read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise StylesError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    except csv.Error as e:
        raise StylesError(f"{what} {path}: not a valid CSV file: {e}") from None


def read_styles(path: str, what: str = "--styles-file") -> tuple[dict[str, PromptStyle], list[str]]:
    """({name: style} in A1111's list order, notes) of a styles CSV or a folder of them; `notes` are one line each
    (a name defined twice). StylesError (one line, starting with `what` and the path) when it can't be read."""
    styles: dict[str, PromptStyle] = {}
    where: dict[str, str] = {}
    notes: list[str] = []
    for file in _csv_files(path, what):
        _read_csv(file, what, styles, where, notes)
    return styles, notes


def apply_styles(styles: dict[str, PromptStyle], names: list[str], prompt: str, negative_prompt: str
                 ) -> tuple[str, str, list[str]]:
    """(prompt, negative prompt, unknown names): the named styles applied in their order by A1111's rules; a name not
    in `styles` is applied as A1111's empty "None" style (which strips the prompt, as A1111's does) and returned."""
    chosen = [styles.get(n, NO_STYLE) for n in names]
    return (apply_styles_to_prompt(prompt, [s.prompt for s in chosen]),
            apply_styles_to_prompt(negative_prompt, [s.negative_prompt for s in chosen]),
            [n for n in names if n not in styles])


def style_path(given: str | None) -> str | None:
    """--styles-file, else $FASTSD_STYLES, else None."""
    return given or os.environ.get(STYLES_ENV) or None
