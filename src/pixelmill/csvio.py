"""Streaming CSV reading with validation, and output CSV writing.

The reader never holds more than one record in memory; every problem it finds names
the physical line of the file, the column and the offending value. See
docs/csv-format.md for the rules.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

SERIAL_NUMBER = "serial_number"
PRODUCT_NAME = "product_name"
INPUT_URLS = "input_image_urls"
OUTPUT_URLS_HEADER = "Output Image Urls"

# Header names are compared after lower-casing and dropping everything but letters/digits.
_HEADER_ALIASES = {
    SERIAL_NUMBER: {"sno", "serialnumber", "serialno", "srno", "sn"},
    PRODUCT_NAME: {"productname"},
    INPUT_URLS: {"inputimageurls", "inputimageurl", "imageurls"},
}
_HEADER_LABELS = {
    SERIAL_NUMBER: "S. No.",
    PRODUCT_NAME: "Product Name",
    INPUT_URLS: "Input Image Urls",
}
MAX_URL_LENGTH = 2048
# The longest cell read, in characters: room for long product descriptions in passed-
# through columns (the csv module's own default, 131,072, is not).
MAX_CELL_CHARS = 1 << 20
MAX_PROBLEMS = 100
_VALUE_PREVIEW = 80
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_NOT_TEXT_MAGIC = {
    b"PK\x03\x04": "a ZIP archive (an .xlsx or .ods workbook?)",
    b"\xd0\xcf\x11\xe0": "an Excel 97-2003 workbook",
    b"%PDF": "a PDF document",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"\x1f\x8b": "a gzip archive",
}
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_EXPORT_HINT = "export the sheet as 'CSV UTF-8 (comma delimited)'"


def _serial_key(serial: str) -> int | str:
    """The value that two serial numbers share when they are the same integer (``007``
    and ``+7``): an int when short (a fraction of a string's memory), else the digits
    without sign or leading zeros, which no conversion limit applies to."""
    negative = serial[0] == "-"
    digits = serial.lstrip("+-").lstrip("0")
    if len(digits) <= 18:
        return -int(digits or "0") if negative else int(digits or "0")
    ascii_digits = "".join(str(int(digit)) for digit in digits)  # any script's digits
    return ("-" if negative else "") + ascii_digits


def normalise_header(name: str) -> str:
    """``'S. No.'`` -> ``'sno'``: the form in which header names are compared."""
    return re.sub(r"[^0-9a-z]", "", name.casefold())


@dataclass(frozen=True)
class CsvProblem:
    """One thing wrong with an uploaded file, and where."""

    line: int | None
    column: str | None
    message: str
    value: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "line": self.line,
            "column": self.column,
            "value": self.value,
            "message": self.message,
        }


class CsvRejected(Exception):
    """The file cannot be accepted; ``status`` is the HTTP status that says why."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        problems: list[CsvProblem] | None = None,
        total_problems: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = problems or []
        self.total_problems = total_problems if total_problems is not None else len(self.problems)


@dataclass(frozen=True)
class CsvLimits:
    """How much one upload may hold."""

    max_rows: int = 5_000_000
    max_urls_per_row: int = 50


@dataclass(slots=True)
class ParsedRow:
    """One product row: its place in the file, its cells and its image URLs."""

    index: int
    line: int
    serial_number: str
    product_name: str
    cells: list[str]
    urls: list[str]
    problems: list[CsvProblem] = field(default_factory=list)


def _preview(value: str) -> str:
    return value if len(value) <= _VALUE_PREVIEW else value[: _VALUE_PREVIEW - 1] + "…"


# The usual shape of a catalogue URL (a host name or address, a port of 0-65535 or none,
# no '@', no spaces, no control characters), accepted without parsing.
_HOST_AND_PORT = (
    r"[A-Za-z0-9.-]+"
    r"(?::(?:[1-5]?[0-9]{1,4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
)
_PLAIN_URL = re.compile(rf"https?://{_HOST_AND_PORT}(?:[/?#][^\s@\x00-\x1f\x7f]*)?")
# A whole ``Input Image Urls`` cell of such URLs, in printable ASCII, with commas and
# spaces between them, accepted in one match: one regex per row instead of one per URL.
# Anything else (other blanks, other characters) is checked URL by URL.
_PLAIN_IN_CELL = rf"https?://{_HOST_AND_PORT}(?:[/?#][!-+\--?A-~]*)?"
_PLAIN_URL_CELL = re.compile(rf"[ ,]*(?:{_PLAIN_IN_CELL}(?:[ ]*,[ ,]*{_PLAIN_IN_CELL})*)?[ ,]*")


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an image source, or None when it is acceptable."""
    if len(url) <= MAX_URL_LENGTH and _PLAIN_URL.fullmatch(url):
        return None
    if len(url) > MAX_URL_LENGTH:
        return f"URL longer than {MAX_URL_LENGTH} characters"
    if any(ch.isspace() for ch in url):
        return "URL contains whitespace"
    if any(ch < " " or ch == "\x7f" for ch in url):
        return "URL contains control characters"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        return f"malformed URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "not an http(s) URL"
    if not parts.hostname:
        return "URL has no host"
    if parts.username is not None or parts.password is not None:
        return "URL carries credentials (user:password@); these are refused"
    del port
    from yarl import URL  # the parser of the fetcher and the webhook sender

    try:
        URL(url)
    except ValueError as exc:
        return f"malformed URL ({exc})"
    return None


def split_urls(cell: str) -> list[str]:
    """The URLs of one ``Input Image Urls`` cell: comma-separated, spaces ignored."""
    return [url for part in cell.split(",") if (url := part.strip())]


def _sniff_binary(head: bytes) -> None:
    if head.startswith(_UTF16_BOMS):
        raise CsvRejected(
            415,
            "unsupported_encoding",
            f"the file is UTF-16; pixelmill reads UTF-8 only: {_EXPORT_HINT}",
        )
    for magic, what in _NOT_TEXT_MAGIC.items():
        if head.startswith(magic):
            raise CsvRejected(415, "not_csv", f"the file is {what}, not CSV text: {_EXPORT_HINT}")
    if b"\x00" in head:
        raise CsvRejected(
            415,
            "not_csv",
            f"the file is binary (it contains NUL bytes), not CSV text: {_EXPORT_HINT}",
        )


_INTEGER = re.compile(r"[+-]?\d+")
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _checked_lines(text: io.TextIOWrapper) -> Iterator[str]:
    """The physical lines of ``text``; refuses the first one that is not valid UTF-8."""
    for number, line in enumerate(text, start=1):
        if not line.isascii() and _UNDECODABLE.search(line):
            raise CsvRejected(
                415,
                "unsupported_encoding",
                f"line {number} is not valid UTF-8: {_EXPORT_HINT}",
                [CsvProblem(number, None, "not valid UTF-8")],
            )
        if "\x00" in line:  # past the sniffed head; no database text may hold one either
            raise CsvRejected(
                415,
                "not_csv",
                f"line {number} contains a NUL byte: the file is binary, not CSV text: "
                f"{_EXPORT_HINT}",
                [CsvProblem(number, None, "contains a NUL byte")],
            )
        yield line


def _has_content(record: list[str]) -> bool:
    """Whether a record is more than a blank line (or a line of empty cells)."""
    return bool(record) and (bool(record[0].strip()) or any(cell.strip() for cell in record))


class CsvReader:
    """Reads and validates an input CSV from a binary stream, one record at a time."""

    def __init__(self, stream: BinaryIO, limits: CsvLimits | None = None) -> None:
        self.limits = limits or CsvLimits()
        buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream)  # type: ignore[type-var]
        _sniff_binary(buffered.peek(4096)[:4096])
        # Undecodable bytes become lone surrogates, caught line by line in _lines(), so
        # the error names the physical line that holds them.
        self._text = io.TextIOWrapper(
            buffered, encoding="utf-8-sig", errors="surrogateescape", newline=""
        )
        csv.field_size_limit(MAX_CELL_CHARS)  # the module's setting: the same for every reader
        self._reader = csv.reader(_checked_lines(self._text), strict=True)
        self.header: list[str] = []
        self.header_line = 1
        self.columns: dict[str, int] = {}
        self._read_header()

    def _next_record(self) -> tuple[int, list[str]] | None:
        """The next record and the physical line it starts on, or None at the end."""
        start = self._reader.line_num + 1
        try:
            return start, next(self._reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            reached = self._reader.line_num
            if "field larger than field limit" in str(exc):
                message = f"a cell is longer than {MAX_CELL_CHARS:,} characters"
                raise CsvRejected(
                    422,
                    "invalid_csv",
                    f"line {start}: {message}, the longest a cell may be",
                    [CsvProblem(start, None, message)],
                ) from None
            # A quote left open runs on to a later line, often the end of the file: the
            # record is named by the line it starts on, where the mistake is.
            spans = ""
            if reached > start:
                spans = f" (the record runs from line {start} to line {reached})"
            raise CsvRejected(
                422,
                "invalid_csv",
                f"line {start}: the file is not well-formed CSV ({exc}){spans}",
                [CsvProblem(start, None, f"malformed CSV: {exc}{spans}")],
            ) from None

    def _read_header(self) -> None:
        found_record = self._next_record()
        while found_record is not None and not _has_content(found_record[1]):
            found_record = self._next_record()
        if found_record is None:
            raise CsvRejected(
                422,
                "empty_csv",
                "the file is empty: expected a header with "
                "'S. No.', 'Product Name' and 'Input Image Urls'",
                [CsvProblem(1, None, "empty file")],
            )
        line, record = found_record
        self.header_line = line
        self.header = [cell.strip() for cell in record]
        problems: list[CsvProblem] = []
        for key, aliases in _HEADER_ALIASES.items():
            found = [i for i, name in enumerate(self.header) if normalise_header(name) in aliases]
            label = _HEADER_LABELS[key]
            if not found:
                problems.append(CsvProblem(line, label, f"required column {label!r} is missing"))
            elif len(found) > 1:
                names = ", ".join(repr(self.header[i]) for i in found)
                problems.append(
                    CsvProblem(line, label, f"column {label!r} appears more than once ({names})")
                )
            else:
                self.columns[key] = found[0]
        if problems:
            raise CsvRejected(422, "invalid_header", "the header is not valid", problems)

    def rows(self) -> Iterator[ParsedRow]:
        """Every non-blank row in file order, each with the problems found in it."""
        index = 0
        seen_serials: set[int | str] = set()
        width = len(self.header)
        while True:
            found_record = self._next_record()
            if found_record is None:
                return
            start_line, record = found_record
            if not _has_content(record):
                continue
            if index >= self.limits.max_rows:
                raise CsvRejected(
                    413,
                    "too_many_rows",
                    f"the file has more than {self.limits.max_rows} rows "
                    "(PIXELMILL_MAX_ROWS); split it into several uploads",
                )
            row = self._parse_row(index, start_line, record, width, seen_serials)
            index += 1
            yield row

    def _parse_row(
        self, index: int, line: int, record: list[str], width: int, seen_serials: set[int | str]
    ) -> ParsedRow:
        problems: list[CsvProblem] = []
        if len(record) > width:
            problems.append(
                CsvProblem(line, None, f"row has {len(record)} cells but the header has {width}")
            )
        cells = record if len(record) == width else record + [""] * (width - len(record))
        serial = cells[self.columns[SERIAL_NUMBER]].strip()
        name = cells[self.columns[PRODUCT_NAME]].strip()
        url_cell = cells[self.columns[INPUT_URLS]]
        if not serial:
            problems.append(CsvProblem(line, "S. No.", "serial number is empty"))
        elif not (serial.isascii() and serial.isdigit()) and not _INTEGER.fullmatch(serial):
            problems.append(
                CsvProblem(line, "S. No.", "serial number is not an integer", _preview(serial))
            )
        elif (number := _serial_key(serial)) in seen_serials:
            problems.append(
                CsvProblem(
                    line, "S. No.", "serial number is used by an earlier row", _preview(serial)
                )
            )
        else:
            seen_serials.add(number)
        if not name:
            problems.append(CsvProblem(line, "Product Name", "product name is empty"))
        urls = split_urls(url_cell)
        if not urls:
            problems.append(CsvProblem(line, "Input Image Urls", "no image URL in the row"))
        elif len(urls) > self.limits.max_urls_per_row:
            problems.append(
                CsvProblem(
                    line,
                    "Input Image Urls",
                    f"{len(urls)} URLs in one row; at most {self.limits.max_urls_per_row} "
                    "(PIXELMILL_MAX_URLS_PER_ROW)",
                )
            )
        if len(url_cell) > MAX_URL_LENGTH or not _PLAIN_URL_CELL.fullmatch(url_cell):
            for url in urls:
                reason = url_problem(url)
                if reason:
                    problems.append(CsvProblem(line, "Input Image Urls", reason, _preview(url)))
        return ParsedRow(index, line, serial, name, cells, urls, problems)


def neutralise_formula(cell: str) -> str:
    """Make a cell that a spreadsheet would run as a formula inert (OWASP CSV injection)."""
    if cell.startswith(_FORMULA_PREFIXES):
        return "'" + cell
    return cell


class OutputCsvWriter:
    """Writes the output CSV: the input cells, then ``Output Image Urls`` by position.

    A failed image leaves an empty slot, so the n-th output URL always belongs to the
    n-th input URL.
    """

    def __init__(self, out: io.TextIOBase, header: list[str]) -> None:
        self._writer = csv.writer(out, lineterminator="\r\n")
        self._writer.writerow([neutralise_formula(name) for name in header] + [OUTPUT_URLS_HEADER])

    def write(self, cells: list[str], output_urls: list[str]) -> None:
        self._writer.writerow([neutralise_formula(c) for c in cells] + [", ".join(output_urls)])
