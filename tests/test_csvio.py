"""The CSV reader and writer of pixelmill, on real bytes (no files, no mocks)."""

from __future__ import annotations

import codecs
import csv
import io
import random
import re
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelmill import csvio
from pixelmill.csvio import (
    MAX_URL_LENGTH,
    OUTPUT_URLS_HEADER,
    CsvLimits,
    CsvProblem,
    CsvReader,
    CsvRejected,
    OutputCsvWriter,
    ParsedRow,
    neutralise_formula,
    split_urls,
)

HEADER = "S. No.,Product Name,Input Image Urls"


def read(data: bytes, limits: CsvLimits | None = None) -> tuple[CsvReader, list[ParsedRow]]:
    reader = CsvReader(io.BytesIO(data), limits)
    return reader, list(reader.rows())


def rejected(data: bytes, limits: CsvLimits | None = None) -> CsvRejected:
    with pytest.raises(CsvRejected) as info:
        read(data, limits)
    return info.value


def lines(*text: str, end: str = "\n") -> bytes:
    return end.join(text).encode() + end.encode()


def problems_of(rows: list[ParsedRow]) -> list[tuple[int | None, str | None, str]]:
    return [(p.line, p.column, p.message) for row in rows for p in row.problems]


# --- header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("serial", "name", "urls"),
    [
        ("S. No.", "Product Name", "Input Image Urls"),
        ("s_no", "product name", "INPUT IMAGE URLS"),
        ("Serial Number", "PRODUCT-NAME", "input_image_urls"),
        ("  sno  ", " Product  Name ", "Input Image URL"),
        ("Sr. No", "product_name", "Image URLs"),
        ("S.N.", "Product.Name", "input-image-urls"),
    ],
)
def test_header_names_match_regardless_of_case_spaces_and_punctuation(
    serial: str, name: str, urls: str
) -> None:
    data = lines(f'"{serial}","{name}","{urls}"', "7,Shirt,https://img.example/a.jpg")
    reader, rows = read(data)
    assert reader.header == [serial.strip(), name.strip(), urls.strip()]
    assert reader.columns == {"serial_number": 0, "product_name": 1, "input_image_urls": 2}
    assert [(r.serial_number, r.product_name, r.urls) for r in rows] == [
        ("7", "Shirt", ["https://img.example/a.jpg"])
    ]
    assert rows[0].problems == []


def test_columns_in_any_order_and_extra_columns_kept_in_cells_in_order() -> None:
    data = lines(
        "Brand,Input Image Urls,Notes,S. No.,Colour,Product Name",
        'Acme,"https://a.example/1.jpg, https://a.example/2.jpg",fragile,1,red,Mug',
        "Other,https://a.example/3.jpg,,2,,Cup",
    )
    reader, rows = read(data)
    assert reader.header == [
        "Brand",
        "Input Image Urls",
        "Notes",
        "S. No.",
        "Colour",
        "Product Name",
    ]
    assert reader.columns == {"input_image_urls": 1, "serial_number": 3, "product_name": 5}
    assert rows[0].cells == [
        "Acme",
        "https://a.example/1.jpg, https://a.example/2.jpg",
        "fragile",
        "1",
        "red",
        "Mug",
    ]
    assert rows[0].urls == ["https://a.example/1.jpg", "https://a.example/2.jpg"]
    assert rows[1].cells == ["Other", "https://a.example/3.jpg", "", "2", "", "Cup"]
    assert [r.index for r in rows] == [0, 1]
    assert all(r.problems == [] for r in rows)


def test_short_row_is_padded_to_the_header_width() -> None:
    _, rows = read(lines("S. No.,Product Name,Input Image Urls,Notes", "1,Mug,http://a/1.jpg"))
    assert rows[0].cells == ["1", "Mug", "http://a/1.jpg", ""]
    assert rows[0].problems == []


def test_row_longer_than_the_header_is_a_problem() -> None:
    _, rows = read(lines(HEADER, "1,Mug,http://a/1.jpg,surplus"))
    assert problems_of(rows) == [(2, None, "row has 4 cells but the header has 3")]


def test_missing_required_columns_are_each_named() -> None:
    error = rejected(lines("Serial,Name,Pictures", "1,Mug,http://a/1.jpg"))
    assert error.status == 422
    assert error.code == "invalid_header"
    assert [(p.line, p.column) for p in error.problems] == [
        (1, "S. No."),
        (1, "Product Name"),
        (1, "Input Image Urls"),
    ]
    assert "'S. No.' is missing" in error.problems[0].message
    assert "'Product Name' is missing" in error.problems[1].message
    assert "'Input Image Urls' is missing" in error.problems[2].message


def test_one_missing_column_is_the_only_problem() -> None:
    error = rejected(lines("S. No.,Product Name,Urls", "1,Mug,http://a/1.jpg"))
    assert [(p.column, p.message) for p in error.problems] == [
        ("Input Image Urls", "required column 'Input Image Urls' is missing")
    ]


def test_duplicated_required_column_names_both_spellings() -> None:
    error = rejected(lines("S. No.,Product Name,s_no,Input Image Urls", "1,Mug,1,http://a/1.jpg"))
    assert error.status == 422
    assert error.code == "invalid_header"
    assert len(error.problems) == 1
    problem = error.problems[0]
    assert (problem.line, problem.column) == (1, "S. No.")
    assert "more than once" in problem.message
    assert "'S. No.'" in problem.message and "'s_no'" in problem.message


def test_header_after_leading_blank_lines_has_its_physical_line() -> None:
    error = rejected(b"\n\n,,\nSerial,Product Name,Input Image Urls\n")
    assert [(p.line, p.column) for p in error.problems] == [(4, "S. No.")]
    reader, rows = read(b"\n\n" + lines(HEADER, "1,Mug,http://a/1.jpg"))
    assert reader.header == ["S. No.", "Product Name", "Input Image Urls"]
    assert rows[0].line == 4


# --- encodings and line endings ------------------------------------------------------


def test_utf8_bom_is_accepted() -> None:
    data = codecs.BOM_UTF8 + lines(HEADER, "1,Café ☕,http://a/1.jpg")
    reader, rows = read(data)
    assert reader.header[0] == "S. No."
    assert reader.columns["serial_number"] == 0
    assert rows[0].product_name == "Café ☕"


@pytest.mark.parametrize("end", ["\r\n", "\n", "\r"], ids=["CRLF", "LF", "CR"])
def test_any_line_ending(end: str) -> None:
    data = lines(
        HEADER,
        '1,Mug,"http://a/1.jpg,http://a/2.jpg"',
        "",
        "2,Cup,http://a/3.jpg",
        end=end,
    )
    _, rows = read(data)
    assert [(r.line, r.serial_number, r.product_name, r.urls) for r in rows] == [
        (2, "1", "Mug", ["http://a/1.jpg", "http://a/2.jpg"]),
        (4, "2", "Cup", ["http://a/3.jpg"]),
    ]
    assert all(r.problems == [] for r in rows)


def test_quoted_cells_with_commas_quotes_and_newlines() -> None:
    data = (
        b"S. No.,Product Name,Input Image Urls,Notes\r\n"
        b'1,"Mug, large ""XL""","http://a/1.jpg, http://a/2.jpg",'
        b'"line one\r\nline two\nline three"\r\n'
        b"2,Plain,http://a/3.jpg,\r\n"
        b'3,"Two\rlines",http://a/4.jpg,"x"\r\n'
        b"4,After,http://a/5.jpg,last\r\n"
    )
    _, rows = read(data)
    assert [r.product_name for r in rows] == ['Mug, large "XL"', "Plain", "Two\rlines", "After"]
    assert rows[0].cells[3] == "line one\r\nline two\nline three"
    assert rows[0].urls == ["http://a/1.jpg", "http://a/2.jpg"]
    # Row 1 spans physical lines 2-4; CR alone also ends a physical line.
    assert [r.line for r in rows] == [2, 5, 6, 8]
    assert all(r.problems == [] for r in rows)


def test_line_of_a_problem_after_a_multiline_cell_is_the_physical_line() -> None:
    data = lines(
        HEADER,
        '1,"Name over\nthree\nlines",http://a/1.jpg',
        "",
        "2,,http://a/2.jpg",
    )
    _, rows = read(data)
    assert [r.line for r in rows] == [2, 6]
    assert problems_of(rows) == [(6, "Product Name", "product name is empty")]


def test_blank_lines_are_skipped_and_not_counted_as_rows() -> None:
    data = lines(HEADER, "", "1,Mug,http://a/1.jpg", "   ", ",,", "", "2,Cup,http://a/2.jpg", "")
    _, rows = read(data)
    assert [(r.index, r.line, r.serial_number) for r in rows] == [(0, 3, "1"), (1, 7, "2")]
    assert all(r.problems == [] for r in rows)


@pytest.mark.parametrize(
    "data",
    [
        HEADER.encode("utf-16"),  # with BOM, platform order
        codecs.BOM_UTF16_LE + (HEADER + "\r\n1,Mug,http://a/1.jpg\r\n").encode("utf-16-le"),
        codecs.BOM_UTF16_BE + (HEADER + "\r\n1,Mug,http://a/1.jpg\r\n").encode("utf-16-be"),
    ],
    ids=["utf-16", "utf-16-le", "utf-16-be"],
)
def test_utf16_is_refused_with_an_export_hint(data: bytes) -> None:
    error = rejected(data)
    assert error.status == 415
    assert error.code == "unsupported_encoding"
    assert "UTF-16" in error.message
    assert "CSV UTF-8" in error.message


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00[Content_Types].xml", "xlsx"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 64, "Excel"),
        (b"%PDF-1.7\n", "PDF"),
        (b"S. No.,Product Name,Input Image Urls\n1,Mu\x00g,http://a/1.jpg\n", "NUL"),
        (HEADER.encode("utf-16-le"), "NUL"),  # UTF-16 without a BOM is full of NULs
    ],
    ids=["xlsx", "xls", "pdf", "nul", "utf16-no-bom"],
)
def test_binary_files_are_refused_with_an_export_hint(data: bytes, what: str) -> None:
    error = rejected(data)
    assert error.status == 415
    assert error.code == "not_csv"
    assert what in error.message
    assert "CSV UTF-8" in error.message


def test_invalid_utf8_on_the_second_line_is_refused() -> None:
    error = rejected(b"S. No.,Product Name,Input Image Urls\n1,Caf\xe9,http://a/1.jpg\n")
    assert error.status == 415
    assert error.code == "unsupported_encoding"
    assert "CSV UTF-8" in error.message


def test_invalid_utf8_in_the_middle_names_its_line() -> None:
    valid = "".join(f"{i},Product {i},http://a/{i}.jpg\n" for i in range(1, 6))
    data = (
        HEADER + "\n" + valid
    ).encode() + b"6,Caf\xe9 latin-1,http://a/6.jpg\n7,Ok,http://a/7.jpg\n"
    error = rejected(data)
    assert error.status == 415
    assert error.code == "unsupported_encoding"
    assert "CSV UTF-8" in error.message
    assert [p.line for p in error.problems] == [7]
    assert "line 7" in error.message


def test_invalid_utf8_far_into_a_large_file_names_its_line() -> None:
    valid = "".join(f"{i},Product {i},http://a/{i}.jpg\n" for i in range(1, 3000))
    data = (HEADER + "\n" + valid).encode() + b"3000,\xff,http://a/x.jpg\n"
    error = rejected(data)
    assert error.status == 415
    assert [p.line for p in error.problems] == [3001]


def test_empty_file_is_422() -> None:
    error = rejected(b"")
    assert error.status == 422
    assert error.code == "empty_csv"
    assert [p.line for p in error.problems] == [1]


def test_file_of_blank_lines_only_is_422() -> None:
    error = rejected(codecs.BOM_UTF8 + b"\r\n\r\n , \r\n")
    assert error.status == 422
    assert error.code == "empty_csv"


def test_malformed_csv_is_422_with_its_line() -> None:
    error = rejected(lines(HEADER, "1,Mug,http://a/1.jpg", '2,"Cup"x,http://a/2.jpg'))
    assert error.status == 422
    assert error.code == "invalid_csv"
    assert [p.line for p in error.problems] == [3]


def test_a_quote_left_open_is_named_by_the_line_it_opens_on() -> None:
    """The reader only notices at the end of the file; the mistake is where it began."""
    error = rejected(
        lines(HEADER, '1,"Cup,http://a/1.jpg', "2,Mug,http://a/2.jpg", "3,Pot,http://a/3.jpg")
    )
    assert error.code == "invalid_csv"
    assert [p.line for p in error.problems] == [2]
    assert "line 2" in error.message and "to line 4" in error.message, error.message


def test_a_header_over_several_lines_is_named_by_its_first_line() -> None:
    error = rejected(lines("", '"S. No.', '",Name,Input Image Urls', "1,A,http://a/1.jpg"))
    assert error.code == "invalid_header"
    assert {p.line for p in error.problems} == {2}


def test_the_header_line_is_its_physical_line() -> None:
    """Where a file with a header and no rows is refused (by the ingest) points."""
    reader = CsvReader(io.BytesIO(lines("", "", "", HEADER, "")))
    assert reader.header_line == 4
    assert list(reader.rows()) == []


def test_cells_up_to_the_cell_limit_are_passed_through() -> None:
    description = "x" * 200_000  # longer than the csv module's default limit
    _, rows = read(lines(HEADER + ",Description", f"1,Mug,http://a/1.jpg,{description}"))
    assert rows[0].cells[3] == description and not rows[0].problems


def test_a_cell_over_the_cell_limit_is_refused_with_its_line() -> None:
    too_long = "x" * (csvio.MAX_CELL_CHARS + 1)
    error = rejected(
        lines(HEADER + ",Description", "1,Mug,http://a/1.jpg", f"2,Pot,http://a/2.jpg,{too_long}")
    )
    assert error.code == "invalid_csv"
    assert [p.line for p in error.problems] == [3]
    assert f"{csvio.MAX_CELL_CHARS:,} characters" in error.message, error.message


def test_serial_numbers_of_any_length_are_compared_as_integers() -> None:
    huge = "1" * 5000  # past the interpreter's limit on converting digits to int
    _, rows = read(
        lines(
            HEADER,
            f"{huge},A,http://a/1.jpg",
            f"+000{huge},B,http://a/2.jpg",
            f"-{huge},C,http://a/3.jpg",
            "007,D,http://a/4.jpg",
            "+7,E,http://a/5.jpg",
            f"{'0' * 30}7,F,http://a/6.jpg",  # long only for its zeros: still 7
            "-00000000000000000000005,G,http://a/7.jpg",
            "-5,H,http://a/8.jpg",
        )
    )
    found = problems_of(rows)
    assert [(line, message) for line, _, message in found] == [
        (3, "serial number is used by an earlier row"),
        (6, "serial number is used by an earlier row"),
        (7, "serial number is used by an earlier row"),
        (9, "serial number is used by an earlier row"),
    ]
    duplicate = rows[1].problems[0]
    assert duplicate.value is not None and len(duplicate.value) <= 80


# --- row problems --------------------------------------------------------------------


def test_each_row_problem_has_its_line_column_and_value() -> None:
    long_url = "https://a.example/" + "x" * (MAX_URL_LENGTH - len("https://a.example/") + 1)
    assert len(long_url) == MAX_URL_LENGTH + 1
    data = lines(
        HEADER,
        "1,Good,http://a/1.jpg",  # line 2
        ",Empty serial,http://a/2.jpg",  # line 3
        "abc,Text serial,http://a/3.jpg",  # line 4
        "1,Duplicate serial,http://a/4.jpg",  # line 5
        "2,,http://a/5.jpg",  # line 6
        "3,No url,",  # line 7
        "4,Ftp,ftp://a/6.jpg",  # line 8
        "5,Credentials,https://user:secret@a/7.jpg",  # line 9
        f"6,Long,{long_url}",  # line 10
        "7,Spaces only, , ",  # line 11 (extra cells, and no URL)
        "+01,Plus-one duplicate,http://a/8.jpg",  # line 12
        "8.5,Decimal serial,http://a/9.jpg",  # line 13
        "9,Relative,/images/1.jpg",  # line 14
        "10,Hostless,http:///x.jpg",  # line 15
        "11,Bad port,http://a:99999/x.jpg",  # line 16
    )
    _, rows = read(data)
    found = [(p.line, p.column, p.message, p.value) for row in rows for p in row.problems]
    assert found[:9] == [
        (3, "S. No.", "serial number is empty", None),
        (4, "S. No.", "serial number is not an integer", "abc"),
        (5, "S. No.", "serial number is used by an earlier row", "1"),
        (6, "Product Name", "product name is empty", None),
        (7, "Input Image Urls", "no image URL in the row", None),
        (8, "Input Image Urls", "not an http(s) URL", "ftp://a/6.jpg"),
        (
            9,
            "Input Image Urls",
            "URL carries credentials (user:password@); these are refused",
            "https://user:secret@a/7.jpg",
        ),
        (10, "Input Image Urls", "URL longer than 2048 characters", long_url[:79] + "…"),
        (11, None, "row has 4 cells but the header has 3", None),
    ]
    assert found[9] == (11, "Input Image Urls", "no image URL in the row", None)
    assert found[10] == (12, "S. No.", "serial number is used by an earlier row", "+01")
    assert found[11] == (13, "S. No.", "serial number is not an integer", "8.5")
    assert found[12] == (14, "Input Image Urls", "not an http(s) URL", "/images/1.jpg")
    assert found[13] == (15, "Input Image Urls", "URL has no host", "http:///x.jpg")
    assert found[14][:2] == (16, "Input Image Urls")
    assert found[14][2].startswith("malformed URL")
    assert len(found) == 15
    assert rows[0].problems == []
    # Every row is still returned, with its index, so all problems can be reported.
    assert [r.index for r in rows] == list(range(15))


def test_url_of_exactly_the_maximum_length_is_accepted() -> None:
    url = "https://a.example/" + "x" * (MAX_URL_LENGTH - len("https://a.example/"))
    assert len(url) == MAX_URL_LENGTH
    _, rows = read(lines(HEADER, f"1,Mug,{url}"))
    assert rows[0].problems == []
    assert rows[0].urls == [url]


def test_credentials_with_user_only_are_refused() -> None:
    _, rows = read(lines(HEADER, "1,Mug,http://user@a.example/1.jpg"))
    assert [p.message for p in rows[0].problems] == [
        "URL carries credentials (user:password@); these are refused"
    ]


@pytest.mark.parametrize("port", ["0", "80", "8080", "65535"])
def test_a_url_with_a_port_is_accepted(port: str) -> None:
    url = f"http://a.example:{port}/1.jpg"
    _, rows = read(lines(HEADER, f"1,Mug,{url}"))
    assert rows[0].problems == []
    assert csvio.url_problem(url) is None


def test_a_port_out_of_range_is_refused() -> None:
    _, rows = read(lines(HEADER, "1,Mug,http://a.example:65536/1.jpg"))
    assert [p.message for p in rows[0].problems] == ["malformed URL (Port out of range 0-65535)"]


def test_control_characters_in_a_url_are_refused() -> None:
    # No database text may hold a NUL, and no fetch should see one.
    for url in ("http://a.example/1\x7f.jpg", "http://a.example:8080/\x01.jpg"):
        _, rows = read(lines(HEADER, f"1,Mug,{url}"))
        assert [p.message for p in rows[0].problems] == ["URL contains control characters"]


def test_one_bad_url_among_good_ones_names_only_the_bad_one() -> None:
    _, rows = read(lines(HEADER, '1,Mug,"http://a/1.jpg, ftp://a/2.jpg, https://a/3.jpg"'))
    assert rows[0].urls == ["http://a/1.jpg", "ftp://a/2.jpg", "https://a/3.jpg"]
    assert [(p.line, p.value) for p in rows[0].problems] == [(2, "ftp://a/2.jpg")]


def test_too_many_urls_per_row() -> None:
    limits = CsvLimits(max_urls_per_row=3)
    data = lines(
        HEADER,
        '1,Three,"http://a/1.jpg,http://a/2.jpg,http://a/3.jpg"',
        '2,Four,"http://a/1.jpg,http://a/2.jpg,http://a/3.jpg,http://a/4.jpg"',
    )
    _, rows = read(data, limits)
    assert rows[0].problems == []
    assert problems_of(rows) == [
        (3, "Input Image Urls", "4 URLs in one row; at most 3 (PIXELMILL_MAX_URLS_PER_ROW)")
    ]


def test_max_rows_exactly_reached_is_accepted() -> None:
    data = lines(HEADER, *(f"{i},P{i},http://a/{i}.jpg" for i in range(1, 4)), "", "")
    _, rows = read(data, CsvLimits(max_rows=3))
    assert len(rows) == 3


def test_max_rows_exceeded_is_413() -> None:
    data = lines(HEADER, *(f"{i},P{i},http://a/{i}.jpg" for i in range(1, 5)))
    reader = CsvReader(io.BytesIO(data), CsvLimits(max_rows=3))
    rows = reader.rows()
    assert [next(rows).serial_number for _ in range(3)] == ["1", "2", "3"]
    with pytest.raises(CsvRejected) as info:
        next(rows)
    assert info.value.status == 413
    assert info.value.code == "too_many_rows"
    assert "3" in info.value.message


def test_problem_as_dict() -> None:
    problem = CsvProblem(3, "S. No.", "serial number is not an integer", "abc")
    assert problem.as_dict() == {
        "line": 3,
        "column": "S. No.",
        "value": "abc",
        "message": "serial number is not an integer",
    }


# --- helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "urls"),
    [
        ("http://a/1.jpg", ["http://a/1.jpg"]),
        ("http://a/1.jpg,http://a/2.jpg", ["http://a/1.jpg", "http://a/2.jpg"]),
        ("  http://a/1.jpg ,   http://a/2.jpg  ", ["http://a/1.jpg", "http://a/2.jpg"]),
        ("http://a/1.jpg,\n\thttp://a/2.jpg", ["http://a/1.jpg", "http://a/2.jpg"]),
        ("http://a/1.jpg,, ,http://a/2.jpg,", ["http://a/1.jpg", "http://a/2.jpg"]),
        ("", []),
        (" , ,", []),
    ],
)
def test_split_urls_ignores_spaces_around_commas(cell: str, urls: list[str]) -> None:
    assert split_urls(cell) == urls


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ('=HYPERLINK("http://evil")', '\'=HYPERLINK("http://evil")'),
        ("+1+2", "'+1+2"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("Mug", "Mug"),
        ("", ""),
        ("a=b", "a=b"),
        (" =1", " =1"),
        ("http://a/1.jpg", "http://a/1.jpg"),
        ("Café, ☕", "Café, ☕"),
    ],
)
def test_neutralise_formula(cell: str, expected: str) -> None:
    assert neutralise_formula(cell) == expected


def test_output_csv_writer_aligns_output_urls_with_an_empty_slot() -> None:
    out = io.StringIO()
    writer = OutputCsvWriter(out, ["S. No.", "Product Name", "Input Image Urls", "Notes"])
    writer.write(
        ["1", "Mug, large", "http://a/1.jpg, http://a/2.jpg, http://a/3.jpg", "=cmd"],
        ["http://out/1.jpg", "", "http://out/3.jpg"],
    )
    writer.write(["2", 'Cup "XL"', "http://a/4.jpg", ""], ["http://out/4.jpg"])
    writer.write(["3", "Broken", "http://a/5.jpg", ""], [""])
    text = out.getvalue()
    assert text.endswith("\r\n")
    records = list(csv.reader(io.StringIO(text, newline="")))
    assert records[0] == ["S. No.", "Product Name", "Input Image Urls", "Notes", OUTPUT_URLS_HEADER]
    assert records[1] == [
        "1",
        "Mug, large",
        "http://a/1.jpg, http://a/2.jpg, http://a/3.jpg",
        "'=cmd",
        "http://out/1.jpg, , http://out/3.jpg",
    ]
    assert records[2] == ["2", 'Cup "XL"', "http://a/4.jpg", "", "http://out/4.jpg"]
    assert records[3] == ["3", "Broken", "http://a/5.jpg", "", ""]
    # Position for position: the n-th output slot belongs to the n-th input URL.
    inputs = [u.strip() for u in records[1][2].split(",")]
    outputs = [u.strip() for u in records[1][4].split(",")]
    assert len(inputs) == len(outputs) == 3
    assert dict(zip(inputs, outputs, strict=True))["http://a/2.jpg"] == ""
    assert text.count("\r\n") == 4


def test_output_csv_writer_neutralises_the_header_too() -> None:
    out = io.StringIO()
    OutputCsvWriter(out, ["S. No.", "Product Name", "Input Image Urls", "=evil"])
    header = next(csv.reader(io.StringIO(out.getvalue())))
    assert header[3] == "'=evil"


# --- property: whatever Python's csv module writes, the reader reads back ------------

_NAME_CHARS = st.characters(
    exclude_categories=["Cs"],  # lone surrogates cannot be encoded as UTF-8
    exclude_characters="\x00",  # NUL marks a binary file
)
_names = (
    st.one_of(
        st.text(_NAME_CHARS, min_size=1, max_size=30),
        st.text(st.sampled_from(list(",\"\r\n '=;é☕漢\t") + list("abc")), min_size=1, max_size=15),
    )
    .map(str.strip)
    .filter(bool)
)
_hosts = st.from_regex(
    re.compile(r"[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\.[a-z]{2,6}){0,2}"), fullmatch=True
)
_paths = st.text(string.ascii_letters + string.digits + "-._~/%=&?", max_size=40)
_urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
    st.sampled_from(["http", "https", "HTTP", "Https"]),  # the scheme is case-blind
    _hosts,
    st.sampled_from(["", ":8080", ":443"]),
    _paths,
)
_dialects = st.sampled_from(
    [
        {"lineterminator": "\r\n", "quoting": csv.QUOTE_MINIMAL},
        {"lineterminator": "\r\n", "quoting": csv.QUOTE_ALL},
        {"lineterminator": "\n", "quoting": csv.QUOTE_ALL},
        {"lineterminator": "\r", "quoting": csv.QUOTE_ALL},
    ]
)


@st.composite
def _tables(draw: st.DrawFn) -> list[tuple[int, str, list[str], str]]:
    serials = draw(st.lists(st.integers(-(10**6), 10**12), min_size=1, max_size=12, unique=True))
    return [
        (
            serial,
            draw(_names),
            draw(st.lists(_urls, min_size=1, max_size=5)),
            draw(st.one_of(st.just(""), _names)),
        )
        for serial in serials
    ]


_BREAK = re.compile(r"\r\n|\r|\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=_tables(), dialect=_dialects, bom=st.booleans(), sep=st.sampled_from([",", ", ", " , "])
)
def test_rows_written_by_python_csv_parse_back_identically(
    table: list[tuple[int, str, list[str], str]], dialect: dict[str, Any], bom: bool, sep: str
) -> None:
    out = io.StringIO(newline="")
    writer = csv.writer(out, **dialect)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls", "Notes"])
    starts = []
    for serial, name, urls, notes in table:
        starts.append(out.tell())
        writer.writerow([serial, name, sep.join(urls), notes])
    text = out.getvalue()
    data = (codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8")

    _, rows = read(data)

    assert [r.problems for r in rows] == [[] for _ in table]
    assert [r.serial_number for r in rows] == [str(serial) for serial, *_ in table]
    assert [r.product_name for r in rows] == [name for _, name, _, _ in table]
    assert [r.urls for r in rows] == [urls for _, _, urls, _ in table]
    assert [r.cells[3] for r in rows] == [notes for *_, notes in table]
    assert [r.index for r in rows] == list(range(len(table)))
    expected_lines = [1 + len(_BREAK.findall(text[:start])) for start in starts]
    assert [r.line for r in rows] == expected_lines


@pytest.mark.parametrize("end", ["\r\n", "\r"], ids=["CRLF", "CR"])
def test_line_numbers_stay_right_across_read_buffer_boundaries(end: str) -> None:
    """Long files are decoded in chunks; a line break split by a chunk edge is one break."""
    for pad in range(0, 24, 3):
        rows = [f"{i},{'N' * (pad + i % 7)},http://a/{i}.jpg" for i in range(1, 700)]
        _, parsed = read(lines(HEADER, *rows, end=end))
        assert [r.line for r in parsed] == list(range(2, 701))
        assert parsed[-1].serial_number == "699"


def test_a_cell_accepted_in_one_match_has_only_acceptable_urls() -> None:
    """The whole-cell fast path never accepts a URL that url_problem would refuse."""
    pieces = [
        "https://a.example/x.jpg", "http://b.example", "http://c.example/?q=1#f", "ftp://x/y",
        "https://u:p@h/x", "https://h:80/x", "https://h/x y", " ", ",", ", ", "\t", "\n",
        "\u00a0", "https://h/\u00e9", "https://", "http://h/a@b", "https://h/\x01", "x",
        "https://h.example/a%2Cb", "\u2028", "https://H-1.example/p", ",,", "https://h/x\u3000",
        "http://h:65535/x", "http://h:65536/x", "http://h:0", "http://h:/x", "http://h:99999",
        "http://h:8080?q", "http://h::80/x",
    ]  # fmt: skip
    rng = random.Random(3)
    accepted = 0
    for _ in range(20000):
        cell = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        if csvio._PLAIN_URL_CELL.fullmatch(cell):
            accepted += 1
            assert all(csvio.url_problem(url) is None for url in csvio.split_urls(cell)), cell
    assert accepted > 1000
    long_url = "https://h.example/" + "x" * csvio.MAX_URL_LENGTH
    _, rows = read(f"S. No.,Product Name,Input Image Urls\n1,A,{long_url}\n".encode())
    assert [p.message for p in rows[0].problems] == ["URL longer than 2048 characters"]
