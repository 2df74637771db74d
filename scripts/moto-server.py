"""moto's DynamoDB server, one request at a time.

moto's own `moto_server` serves requests on many threads, and its DynamoDB model has no locks:
two UpdateItem ADDs on one item at once can lose one (a read-modify-write race in Python).
DynamoDB applies each write atomically; serving one request at a time gives the tests that
guarantee. Usage: python moto-server.py HOST PORT
"""

import signal
import sys

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


def backup_what_a_transaction_touches() -> None:
    """moto's transact_write_items backs up a whole table (a deep copy, for its rollback) once
    per item of the transaction: a credit grant's five items copy a table of thousands of items
    five times. The rollback needs only the items the transaction names (a write touches no
    other): the backup here shares the others and copies those, so the answers and the rollback
    are as before, at a cost that does not grow with the table."""
    import copy
    from collections import defaultdict

    from moto.dynamodb import models
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.models.table import Table

    real = models.DynamoDBBackend.transact_write_items
    named: list[dict] = []
    memo: dict[int, Table] = {}
    inside = [False]

    def backup(table: Table) -> Table:
        copied = copy.copy(table)
        copied.items = defaultdict(dict)
        for h, part in table.items.items():
            copied.items[h] = dict(part) if isinstance(part, dict) else part
        for op in named:
            if op.get("TableName") != table.name:
                continue
            key = op.get("Key") or op.get("Item") or {}
            if table.hash_key_attr not in key:
                continue
            h = DynamoType(key[table.hash_key_attr])
            if table.range_key_attr is None:
                if h in table.items:
                    copied.items[h] = copy.deepcopy(table.items[h])
            elif table.range_key_attr in key:
                r = DynamoType(key[table.range_key_attr])
                if h in table.items and r in table.items[h]:
                    copied.items[h][r] = copy.deepcopy(table.items[h][r])
        return copied

    class Copy:
        @staticmethod
        def deepcopy(x, *args, **kwargs):
            if inside[0] and isinstance(x, Table):
                if id(x) not in memo:
                    memo[id(x)] = backup(x)
                return memo[id(x)]
            return copy.deepcopy(x, *args, **kwargs)

    def transact_write_items(self, transact_items):
        inside[0] = True
        memo.clear()
        named[:] = [op for item in transact_items for op in item.values() if isinstance(op, dict)]
        try:
            return real(self, transact_items)
        finally:
            inside[0] = False
            memo.clear()
            named.clear()

    models.copy = Copy
    models.DynamoDBBackend.transact_write_items = transact_write_items


def main() -> None:
    backup_what_a_transaction_touches()
    host, port = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, app, threaded=False, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
