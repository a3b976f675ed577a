#!/usr/bin/python3
"""The dashboard in a real browser (Debian's chromium, headless, driven by chromedriver through
Selenium): log in with the admin token; create a VM through the API and see it in the VMs table
within 2 s without the page reloading; stop it from the page; open its availability chart; look
at hosts, events and the bill. A screenshot of each page goes to OUT_DIR.

Usage: dashboard.py API_URL TOKEN_FILE CA_FILE IMAGE OUT_DIR   (run by the fleet test
`the_dashboard_works_in_a_real_browser`; exits non-zero with the reason on any failure)
"""
import json
import os
import ssl
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

api, token_file, ca, image, out = sys.argv[1:6]
token = open(token_file).read().strip()
os.makedirs(out, exist_ok=True)
tls = ssl.create_default_context(cafile=ca)


def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"authorization": "Bearer " + token,
                                          "content-type": "application/json"})
    with urllib.request.urlopen(req, context=tls, timeout=30) as r:
        return json.loads(r.read() or b"null")


opts = webdriver.ChromeOptions()
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=1400,1000", "--user-data-dir=" + os.path.join(out, "profile")]:
    opts.add_argument(a)
opts.binary_location = "/usr/bin/chromium"
# vimd's certificate is from its own CA, which this throwaway browser profile does not have.
opts.accept_insecure_certs = True
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
driver.set_page_load_timeout(30)


def wait(what, cond, timeout=30):
    try:
        # An element found just before the page redrew it is stale: look again.
        return WebDriverWait(driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=[StaleElementReferenceException]).until(lambda d: cond())
    except Exception:
        shot("failed")
        raise SystemExit(f"dashboard: timed out waiting for {what}")


def shot(name):
    driver.save_screenshot(os.path.join(out, f"{name}.png"))


def text(css):
    # In the page, at once: no element can go stale between finding it and reading it.
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent).join(' ')", css)


def click(css):
    # The real click, looked up again if the page redrew the element in between.
    wait(f"{css} clickable", lambda: driver.find_element(By.CSS_SELECTOR, css).is_enabled())
    for _ in range(5):
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise SystemExit(f"dashboard: {css} kept being redrawn")


try:
    hour_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    call("PUT", "/prices/default", {"vcpu_hour": "0.04", "gib_hour": "0.005", "since": hour_ago})
    driver.get(api + "/ui/")
    wait("the login form", lambda: driver.find_element(By.ID, "login").is_displayed())
    shot("1-login")
    driver.find_element(By.ID, "token").send_keys("not-a-token")
    driver.find_element(By.ID, "login-button").click()
    wait("a refused login", lambda: "401" in driver.find_element(By.ID, "login-error").text)
    driver.find_element(By.ID, "token").clear()
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    wait("the hosts table", lambda: driver.find_elements(By.CSS_SELECTOR, "#hosts-table tr[data-host]"))
    wait("a load bar", lambda: driver.find_elements(By.CSS_SELECTOR, "#hosts-table svg.bar"))
    shot("2-hosts")

    driver.get(api + "/ui/#vms")
    wait("the VMs table", lambda: driver.find_elements(By.CSS_SELECTOR, "#vms-table tr"))
    # A mark on the page: it is gone if the page reloads.
    driver.execute_script("window.__no_reload = 1")
    vm = call("POST", "/vms", {"name": "from-api", "image": image, "vcpus": 1, "memory_mib": 64,
                               "net": False})["vm_id"]
    created = time.monotonic()
    row = f'#vms-table tr[data-vm="{vm}"]'
    wait("the new VM in the table", lambda: driver.find_elements(By.CSS_SELECTOR, row), timeout=2)
    seen = time.monotonic() - created
    if driver.execute_script("return window.__no_reload") != 1:
        raise SystemExit("dashboard: the page reloaded")
    print(f"dashboard: the VM appeared {seen:.2f} s after the API answered")
    wait("the VM running", lambda: "running" in text(row + " td.state"), timeout=60)
    shot("3-vms")
    click(f'button[data-action="stop"][data-vm="{vm}"]')
    wait("the VM stopped", lambda: "stopped" in text(row + " td.state"), timeout=90)
    if call("GET", f"/vms/{vm}")["state"] != "stopped":
        raise SystemExit("dashboard: the page says stopped, the API does not")
    shot("4-stopped")

    click(row + " a.vm-link")
    wait("the availability chart", lambda: driver.find_elements(By.CSS_SELECTOR, "#availability svg rect.up"))
    if driver.execute_script("return window.__no_reload") != 1:
        raise SystemExit("dashboard: opening a VM reloaded the page")
    shot("5-availability")

    driver.get(api + "/ui/#events")
    wait("events", lambda: driver.find_elements(By.CSS_SELECTOR, '#events-list tr[data-kind="VM_Stopped"]'))
    # Live: an event after the page opened arrives through the stream.
    time.sleep(1)
    call("POST", f"/vms/{vm}/start")
    wait("a live VM_Started", lambda: driver.find_elements(By.CSS_SELECTOR, '#events-list tr[data-kind="VM_Started"]'), timeout=60)
    shot("6-events")

    driver.get(api + "/ui/#bill")
    wait("the bill", lambda: "EUR" in text("#bill-table"))
    shot("7-bill")
    errors = [l for l in driver.get_log("browser") if l["level"] == "SEVERE" and "401" not in l["message"]]
    if errors:
        raise SystemExit(f"dashboard: browser console errors: {errors}")
    print("dashboard: ok")
finally:
    driver.quit()
