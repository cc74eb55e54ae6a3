"""``saft-gx query``: read-only SQL over the scores database, and over nothing else."""

from __future__ import annotations

import json

import click

from ..io import store


@click.command()
@click.argument("sql")
@click.option("--db", default="saft.duckdb", show_default=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of row objects (one line per statement).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (a blank line between statements).")
@click.option("--allow-files", is_flag=True,
              help="Also let the SQL read files (read_csv, read_parquet …); only reading statements run.")
def query(sql: str, db: str, as_json: bool, as_csv: bool, allow_files: bool) -> None:
    """Run SQL on the database, opened read-only. Example:

    saft-gx query "select harm_flag, count(*) from data group by 1"

    The SQL sees this database only: no files, network, extensions or settings (--allow-files: reading
    files too). Several statements separated by ';' run in order and every result is printed.
    """
    for i, df in enumerate(store.query_all(db, sql, allow_files=allow_files)):
        if as_json:
            click.echo(json.dumps(json.loads(df.to_json(orient="records", date_format="iso")), indent=None))
            continue
        if i:
            click.echo("")
        if as_csv:
            click.echo(df.to_csv(index=False), nl=False)
        elif df.empty:
            click.echo("(no rows)" if len(df.columns) else "ok")
        else:
            click.echo(df.to_string(index=False, max_colwidth=60))


COMMANDS = [query]
