"""Open a run's explorer page in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium), check it, and take the docs' screenshot.

The browser test (tests/test_explorer.py) and the docs screenshot use this same code:

    python tests/explorer_browser.py    # trains 400 steps, writes docs/img/explorer.png
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
# a run small enough for a test: every task, two layers of eight heads
RUN_SETTINGS = [
    "train.steps=30",
    "train.eval_every=15",
    "train.log_every=5",
    "train.batch_size=16",
    "train.eval_batches=1",
    "model.d_model=64",
    "model.num_layers=2",
]


def browser_missing() -> str | None:
    """Why no browser test can run here, or ``None``."""
    try:
        import selenium  # noqa: F401
    except ModuleNotFoundError:
        return "selenium is not installed (the test extra brings it)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists() and shutil.which(Path(path).name) is None:
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1300, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium session (closed network flags: this machine has no internet)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--window-size={width},{height}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        service = Service(shutil.which("chromedriver") or CHROMEDRIVER)
        driver = webdriver.Chrome(service=service, options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver: Any, page: Path) -> None:
    """Load the page and wait until every plotly figure has drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script(
            "const divs = [...document.querySelectorAll('.plotly-graph-div')];"
            "return divs.length > 0"
            " && divs.every(g => g._fullLayout && g.querySelector('.main-svg'));"
        )
    )


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _point(driver: Any, div_id: str, x: float, y: float, trace: int = 0) -> tuple[float, float]:
    """Viewport coordinates of data point (x, y) of a figure, scrolled into view."""
    return tuple(
        driver.execute_script(
            """
            const gd = document.getElementById(arguments[0]);
            gd.scrollIntoView({block: "center"});
            const full = gd._fullData[arguments[3]];
            const xa = gd._fullLayout[full.xaxis.replace("x", "xaxis")];
            const ya = gd._fullLayout[full.yaxis.replace("y", "yaxis")];
            const box = gd.querySelector(".main-svg").getBoundingClientRect();
            return [box.left + xa._offset + xa.l2p(arguments[1]),
                    box.top + ya._offset + ya.l2p(arguments[2])];
            """,
            div_id,
            x,
            y,
            trace,
        )
    )


def hover(driver: Any, div_id: str, x: float, y: float, trace: int = 0) -> str:
    """Move the mouse over data point (x, y); the hover label's text."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    px, py = _point(driver, div_id, x, y, trace)
    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(int(px), int(py))
    actions.perform()
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script(
            "return document.querySelector(`#${arguments[0]} .hoverlayer .hovertext`)", div_id
        )
    )
    return str(
        driver.execute_script(
            "return document.querySelector(`#${arguments[0]} .hoverlayer .hovertext`).textContent",
            div_id,
        )
    )


def click(driver: Any, div_id: str, x: float, y: float, trace: int = 0) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    px, py = _point(driver, div_id, x, y, trace)
    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(int(px), int(py))
    actions.w3c_actions.pointer_action.click()
    actions.perform()


def shown_gates(driver: Any) -> dict[str, Any]:
    """The visible gates trace's name and cells, and the rows marked as routed."""
    return dict(
        driver.execute_script(
            """
            const gd = document.getElementById("gh-gates");
            const marks = gd.data[gd.data.length - 1];
            const trace = gd.data.find((t, i) => i < gd.data.length - 1 && t.visible !== false);
            return {name: trace.name, customdata: trace.customdata, marked: [...marks.y]};
            """
        )
    )


def selection(driver: Any) -> str:
    return str(driver.execute_script("return document.getElementById('gh-selection').textContent"))


def pick_menu_item(driver: Any, div_id: str, index: int) -> None:
    """Open a figure's drop-down menu and click its ``index``-th item, as a user does."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    div = driver.find_element(By.ID, div_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", div)
    ActionChains(driver).click(div.find_element(By.CSS_SELECTOR, ".updatemenu-header")).perform()
    items = WebDriverWait(driver, 10).until(
        lambda d: div.find_elements(By.CSS_SELECTOR, ".updatemenu-dropdown-button")
    )
    ActionChains(driver).click(items[index]).perform()


def head_graph_ids(driver: Any) -> list[str]:
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll('.gh-heads')]"
            ".filter(g => (g.layout.title.text || '').includes('head graph')).map(g => g.id)"
        )
    )


def edge_counts(driver: Any, div_id: str) -> tuple[int, int]:
    """(arrows drawn in the SVG, annotations the figure marks visible)."""
    return tuple(
        driver.execute_script(
            """
            const gd = document.getElementById(arguments[0]);
            const drawn = [...gd.querySelectorAll("g.annotation")]
                .filter(a => a.querySelector("path")).length;
            const visible = gd.layout.annotations.filter(a => a.visible !== false).length;
            return [drawn, visible];
            """,
            div_id,
        )
    )


def screenshot(page: Path, out: Path) -> Path:
    """The docs' screenshot: layer 0's head graph and the gates figure after a click on a
    routed head."""
    with chromium(1300, 2300) as driver:
        open_page(driver, page)
        graph = head_graph_ids(driver)[0]
        heads = driver.execute_script(
            "return document.getElementById(arguments[0]).data.length - 1", graph
        )
        x, y = driver.execute_script(
            "const t = document.getElementById(arguments[0]).data[arguments[1]];"
            "return [t.x[3], t.y[3]]",
            graph,
            heads,
        )
        click(driver, graph, x, y, heads)
        driver.execute_script(
            "document.getElementById(arguments[0]).closest('.row').scrollIntoView()", graph
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    return out


def train_small_run(folder: Path, *more: str) -> Path:
    """Train the test's run (``more``: settings that override it) into ``folder``."""
    from graphheads.train import RunConfig, Trainer

    Trainer(RunConfig.load(None, [*RUN_SETTINGS, *more]), folder, progress=False).fit()
    return folder


if __name__ == "__main__":
    from graphheads.explorer_page import write_explorer

    with tempfile.TemporaryDirectory() as tmp:  # the docs' run learns for longer
        run = train_small_run(Path(tmp) / "run", "train.steps=400", "train.eval_every=100")
        page = write_explorer(run)
        out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "explorer.png"
        print(screenshot(page, out))
