"""Keyset pagination, as every list of the API pages: (created_at, id) order, an opaque cursor."""

from __future__ import annotations

from typing import Any

from flask_smorest import abort
from marshmallow import ValidationError
from sqlalchemy import Select, tuple_
from sqlalchemy.orm import InstrumentedAttribute

from api.db import db_session
from api.schemas import decode_cursor, encode_cursor


def keyset_page(
    stmt: Select, entity: type, args: dict, *, newest_first: bool
) -> tuple[list[Any], str | None]:
    """One page of `stmt` in (created_at, id) order, and the cursor of the next page (None: last).

    `entity` is the mapped class whose created_at and id order the rows; the rows are returned as
    selected. An invalid cursor is a 422 naming it.
    """
    created_at: InstrumentedAttribute = entity.created_at
    ident: InstrumentedAttribute = entity.id
    if args.get("cursor"):
        try:
            after = decode_cursor(args["cursor"])
        except ValidationError as exc:
            abort(422, errors={"query": {"cursor": exc.messages}})
        key = tuple_(created_at, ident)
        stmt = stmt.where(key < after if newest_first else key > after)
    order = (created_at.desc(), ident.desc()) if newest_first else (created_at.asc(), ident.asc())
    limit = args["limit"]
    rows = db_session().execute(stmt.order_by(*order).limit(limit + 1)).all()
    items = rows[:limit]
    if len(rows) <= limit:
        return items, None
    last = getattr(items[-1], entity.__name__)
    return items, encode_cursor(last.created_at, last.id)
