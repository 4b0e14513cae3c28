"""Querysets compiled to SQL once per connection, for the reads on every device request.

Building and compiling a queryset costs about 1 ms of Python here, several times the query
itself (docs/performance.md, "The device poll and its caches"). For a read whose shape never
changes, only some parameter values do (the device's id, a session's uuid), ``CompiledRead``
compiles the queryset once per thread and connection with placeholder values, then runs that SQL
with each call's values and turns the rows into model instances the way a queryset does (Django's
converters, ``from_db``, ``select_related`` populators, annotations as attributes). The rows are
read on every call: nothing is cached but the SQL.

On PostgreSQL the statement goes through ``ota_site.db.hot_cursor``, so it is also prepared once
per connection. Errors, query logging and ``assertNumQueries`` work as for any query.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model, QuerySet
from django.db.models.query import get_related_populators

from ota_site.db import hot_cursor

M = TypeVar("M", bound=Model)


class _Compiled(Generic[M]):
    def __init__(
        self,
        db: BaseDatabaseWrapper,
        queryset: QuerySet[M],
        slots: Sequence[tuple[Field[Any, Any], Any]],
    ) -> None:
        self.db = db
        self.model = queryset.model
        self.compiler = queryset.query.get_compiler(connection=db)
        sql, params = self.compiler.as_sql()
        self.sql, self.params = sql, list(params)
        self.slots = []
        for field, placeholder in slots:
            prepared = field.get_db_prep_value(placeholder, db)
            positions = [n for n, value in enumerate(params) if value == prepared]
            if len(positions) != 1:
                raise RuntimeError(f"placeholder {placeholder!r} is not once among {params}")
            self.slots.append((field, positions[0]))
        select, klass_info = self.compiler.select, self.compiler.klass_info
        assert klass_info is not None
        fields = klass_info["select_fields"]
        self.fields = slice(fields[0], fields[-1] + 1)
        self.names = [column[0].target.attname for column in select[self.fields]]
        # (django-stubs describe a later Django, whose function takes a fetch mode too.)
        self.populators = get_related_populators(klass_info, select, db.alias)  # type: ignore[call-arg]
        self.annotations = list(self.compiler.annotation_col_map.items())

    def run(self, values: Sequence[Any]) -> list[M]:
        params = list(self.params)
        for (field, position), value in zip(self.slots, values, strict=True):
            params[position] = field.get_db_prep_value(value, self.db)
        with hot_cursor(self.db) as cursor:
            cursor.execute(self.sql, params)
            rows = cursor.fetchall()
        found = []
        for row in self.compiler.results_iter(results=[rows]):
            obj = self.model.from_db(self.db.alias, self.names, row[self.fields])
            for populator in self.populators:
                populator.populate(row, obj)
            for name, position in self.annotations:
                setattr(obj, name, row[position])
            found.append(obj)
        return found


class CompiledRead(Generic[M]):
    """``build(*placeholders)`` compiled once per thread and connection; call it with values.

    ``slots`` name each parameter: the model field whose type it has, and a placeholder value
    that must appear exactly once among the compiled query's parameters (use values no row has,
    e.g. a fixed uuid). Calling with one value per slot returns the matching rows as instances.
    """

    def __init__(
        self,
        build: Callable[..., QuerySet[M]],
        *slots: tuple[Field[Any, Any], Any],
        using: str = DEFAULT_DB_ALIAS,
    ) -> None:
        self.build, self.slots, self.using = build, slots, using
        # A compiler belongs to the connection it compiled for, and connections to threads.
        self.local = threading.local()

    def __call__(self, *values: Any) -> list[M]:
        db = connections[self.using]
        compiled: _Compiled[M] | None = getattr(self.local, "compiled", None)
        if compiled is None or compiled.db is not db:
            queryset = self.build(*(placeholder for _, placeholder in self.slots))
            compiled = self.local.compiled = _Compiled(db, queryset, self.slots)
        return compiled.run(values)
