"""One list of filter values for the CLI, the HTTP API and the page."""
import re
from importlib import resources

from mammo_retrieval.app.cli.query import query
from mammo_retrieval.search.filters import LATERALITIES, VIEW_FILTERS


def test_the_cli_and_the_page_offer_exactly_the_shared_values():
    options = {o.name: o for o in query.params}
    assert tuple(options["view"].type.choices) == VIEW_FILTERS
    assert tuple(options["laterality"].type.choices) == LATERALITIES
    import click
    shown = query.get_help(click.Context(query))
    assert "--view [CC|MLO|ML|LM|XCCL]" in shown and "--laterality [L|R]" in shown  # as the README writes them
    page = resources.files("mammo_retrieval.app.http").joinpath("static/index.html").read_text()

    def menu(name):
        select = re.search(rf'<select id="{name}"[^>]*>(.*?)</select>', page, re.S).group(1)
        return tuple(re.findall(r"<option(?: value=\"([^\"]*)\")?>([^<]*)</option>", select))

    assert tuple(text for _, text in menu("view")[1:]) == VIEW_FILTERS and menu("view")[0] == ("", "any")
    assert tuple(value for value, _ in menu("laterality")[1:]) == LATERALITIES
