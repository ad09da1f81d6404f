"""Keyset pagination, as every list of the API pages: (time, id) order and a cursor of the last item's
(time, id), which the OpenAPI document describes by a pattern (api/schemas.py, CURSOR)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import InstrumentedAttribute

from api.db import db_session
from api.schemas import decode_cursor, encode_cursor

# The largest BIGINT: a cursor's id beyond it is a position after every row.
BIGINT_MAX = 2**63 - 1


def keyset_page(
    stmt: Select,
    order: tuple[InstrumentedAttribute, InstrumentedAttribute],
    args: dict,
    *,
    newest_first: bool,
) -> tuple[list[Any], str | None]:
    """One page of `stmt` (which selects one entity) in `order`, a (time, id) pair of its columns, and
    the cursor of the next page (None: the last page). Rows are returned as selected."""
    time_column, id_column = order
    if args.get("cursor"):
        after_time, after_id = decode_cursor(args["cursor"])  # validated by the arguments schema
        key = tuple_(time_column, id_column)
        after = (after_time, _id_value(id_column, after_id))
        stmt = stmt.where(key < after if newest_first else key > after)
    columns = (time_column.desc(), id_column.desc()) if newest_first else (time_column.asc(), id_column.asc())
    limit = args["limit"]
    rows = db_session().execute(stmt.order_by(*columns).limit(limit + 1)).all()
    items = rows[:limit]
    if len(rows) <= limit:
        return items, None
    last = items[-1][0]
    return items, encode_cursor(getattr(last, time_column.key), getattr(last, id_column.key))


def _id_value(id_column: InstrumentedAttribute, number: int) -> uuid.UUID | int:
    """A cursor's id (a number of up to 128 bits) as the column's type: a UUID, or an integer that
    BIGINT can hold."""
    if id_column.type.python_type is uuid.UUID:
        return uuid.UUID(int=number)
    return min(number, BIGINT_MAX)
