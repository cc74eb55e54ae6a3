"""``saft-gx query``: read-only SQL over the scores database."""

from __future__ import annotations

import json

import click

from .. import store


@click.command()
@click.argument("sql")
@click.option("--db", default="saft.duckdb", show_default=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of row objects.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
def query(sql: str, db: str, as_json: bool, as_csv: bool) -> None:
    """Run SQL on the database, opened read-only. Example:

    saft-gx query "select harm_flag, count(*) from data group by 1"
    """
    df = store.query(db, sql)
    if as_json:
        click.echo(json.dumps(json.loads(df.to_json(orient="records", date_format="iso")), indent=None))
    elif as_csv:
        click.echo(df.to_csv(index=False), nl=False)
    elif df.empty:
        click.echo("(no rows)" if len(df.columns) else "ok")
    else:
        click.echo(df.to_string(index=False, max_colwidth=60))


COMMANDS = [query]
