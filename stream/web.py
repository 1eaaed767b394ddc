"""The eyeball-queue web app: ranked list, object pages and vetting, server-rendered.

Built with Flask (imported lazily by ``vigil queue serve``). Plots are inline SVG
drawn here and cutouts are PNGs rendered here from the FITS stamps, so the pages
need no JavaScript library and no network. A little vanilla JS (``static/queue.js``)
adds keyboard shortcuts and the "new alerts" poll.

Authentication: one shared token. Browsers log in through a form (vetter name +
token) that sets a signed session cookie; scripts send ``Authorization: Bearer
<token>`` (and optionally ``X-Vetter``). Nothing but ``GET /health`` and the login
page is served without it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import math
import secrets
import struct
import time
import warnings
import zlib
from dataclasses import dataclass, fields
from functools import lru_cache
from urllib.parse import urlencode

import numpy as np

from stream import MissingExtra
from stream.queue import (
    ACTIONS,
    KNOWN_SSO_ARCSEC,
    SORTS,
    STAGES,
    ListQuery,
    QueueStore,
    analyze,
    extrapolated_text,
    type_words,
)

log = logging.getLogger(__name__)

MJD_UNIX_EPOCH = 40587.0
BAND_COLOURS = {"u": "#7b3fb5", "g": "#1f9e3a", "r": "#d62728", "i": "#e07b00", "z": "#8c564b", "y": "#333333"}
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
               '<circle cx="8" cy="8" r="6" fill="#2b5fd9"/></svg>')
KEYS = {"r": "real", "b": "bogus", "g": "galactic", "x": "extragalactic", "f": "follow_up", "n": "no_follow_up",
        "s": "snooze"}


# ----------------------------------------------------------------------------------- images: FITS -> PNG


def png_encode(img: np.ndarray) -> bytes:
    """Encode a 2-D ``uint8`` array as an 8-bit greyscale PNG (zlib only, no Pillow).

    Parameters
    ----------
    img : numpy.ndarray
        Shape ``(height, width)``, dtype ``uint8``; row 0 is the top of the image.

    Returns
    -------
    bytes
    """
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = np.hstack([np.zeros((h, 1), np.uint8), img]).tobytes()  # filter byte 0 ("none") per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


#: Largest stamp the page will unpack and draw: ZTF's are 63×63 (~20 kB as FITS), Rubin's a few
#: times that. A stamp comes from an untrusted alert; a gzip "bomb" of a few kB would otherwise
#: unpack to gigabytes in the web server.
MAX_STAMP_BYTES = 8 * 2**20
MAX_STAMP_PIXELS = 1024 * 1024


def _gunzip_bounded(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=31)  # gzip framing
    out = d.decompress(data, limit + 1)
    if len(out) > limit:
        raise ValueError(f"stamp unpacks to more than {limit} bytes")
    return out


def fits_image(data: bytes) -> np.ndarray:
    """The first 2-D image in a FITS stamp (gunzipped first if needed), as float.

    Raises
    ------
    ValueError
        No image, or a stamp larger than :data:`MAX_STAMP_BYTES` unpacked or
        :data:`MAX_STAMP_PIXELS` pixels.
    """
    from astropy.io import fits

    if data[:2] == b"\x1f\x8b":  # ZTF stamps are gzipped FITS
        data = _gunzip_bounded(data, MAX_STAMP_BYTES)
    elif len(data) > MAX_STAMP_BYTES:
        raise ValueError(f"stamp of {len(data)} bytes")
    # Some survey stamps have slightly non-standard headers; astropy reads them but warns per file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        with fits.open(io.BytesIO(data), memmap=False) as hdus:
            for hdu in hdus:
                shape = hdu.shape if hasattr(hdu, "shape") else ()
                if len(shape) >= 2 and int(np.prod(shape[-2:])) > MAX_STAMP_PIXELS:
                    raise ValueError(f"stamp of {shape[-1]}×{shape[-2]} pixels")
                arr = getattr(hdu, "data", None)
                if arr is not None and getattr(arr, "ndim", 0) >= 2:
                    arr = np.asarray(arr, dtype=float)
                    while arr.ndim > 2:
                        arr = arr[0]
                    return arr
    raise ValueError("no image in FITS stamp")


def stretch(arr: np.ndarray, symmetric: bool = False, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Linear percentile stretch to ``uint8``; ``symmetric`` centres zero (difference images)."""
    a = np.asarray(arr, dtype=float)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    v = a[finite]
    if symmetric:
        hi = float(np.percentile(np.abs(v), hi_pct)) or 1.0
        lo = -hi
    else:
        lo, hi = (float(x) for x in np.percentile(v, [lo_pct, hi_pct]))
        if hi <= lo:
            hi = lo + 1.0
    a = np.where(finite, a, lo)
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def _local_path(target) -> str:
    """``target`` if it is a path on this site, else ``/``: no open redirects.

    Browsers drop tabs and newlines and read a backslash as a slash, so ``/\t/evil.example``
    or ``/\\evil.example`` would leave the site; anything with a scheme or a host does too.
    """
    from urllib.parse import urlsplit

    if not isinstance(target, str):
        return "/"
    t = "".join(ch for ch in target if ch >= " " and ch != "\x7f").replace("\\", "/")
    parts = urlsplit(t)
    if not t.startswith("/") or t.startswith("//") or parts.scheme or parts.netloc:
        return "/"
    return t


@lru_cache(maxsize=512)
def _cutout_png_cached(data: bytes, kind: str) -> bytes:
    img = stretch(fits_image(data), symmetric=(kind == "difference"))
    return png_encode(np.flipud(img))  # FITS row 0 is the bottom; PNG row 0 is the top


def cutout_png(data: bytes, kind: str) -> bytes:
    """PNG of one FITS stamp (north up as stored, y flipped to screen order)."""
    return _cutout_png_cached(bytes(data), kind)  # the stamp bytes themselves are the cache key


# ----------------------------------------------------------------------------------- plots: inline SVG


def _ticks(lo: float, hi: float, n: int = 5) -> list:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 or v == 0 else f"{v:.3g}"


def lightcurve_svg(lc: dict | None, which: str = "raw", width: int = 620, height: int = 250,
                   trigger_mjd: float | None = None) -> str:
    """A light-curve plot as an SVG string.

    Parameters
    ----------
    lc : dict or None
        Columns ``mjd, band, flux, flux_err, kind`` and optionally ``flux_corrected``
        (lists, None for missing), as stored by :class:`stream.queue.QueueSink`.
    which : {"raw", "corrected"}
        Which flux to plot. Non-detections (kind 2) are drawn as downward triangles
        at their 5σ limit (``5 × flux_err``); forced photometry as open circles.
    width, height : int
    trigger_mjd : float, optional
        Marks the alert's own epoch with a vertical line.

    Returns
    -------
    str
        ``<svg>`` markup (safe: built from numbers and escaped band names only).
    """
    from markupsafe import escape

    head = (f'<svg class="lc" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="light curve ({which})">')
    if not lc or (which == "corrected" and lc.get("flux_corrected") is None):
        msg = "no light curve stored" if not lc else "no per-point HSR correction stored for this alert"
        height = 56  # a short placeholder, not a big empty plot
        head = (f'<svg class="lc empty" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
                f'width="{width}" height="{height}" role="img" aria-label="light curve ({which})">')
        return (head + f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>'
                f'<text x="{width / 2}" y="{height / 2 + 4}" text-anchor="middle" fill="#777">{msg}</text></svg>')
    t = np.array([np.nan if v is None else v for v in lc["mjd"]], dtype=float)
    fcol = lc["flux_corrected"] if which == "corrected" else lc["flux"]
    f = np.array([np.nan if v is None else v for v in fcol], dtype=float)
    e = np.array([np.nan if v is None else v for v in lc["flux_err"]], dtype=float)
    k = np.array(lc["kind"], dtype=int)
    band = np.array(lc["band"], dtype=str)
    nd = k == 2
    ylim = np.where(nd, 5 * e, np.nan)  # 5σ upper limit
    ys = np.concatenate([(f - np.nan_to_num(e))[~nd], (f + np.nan_to_num(e))[~nd], ylim[nd], [0.0]])
    ys = ys[np.isfinite(ys)]
    ts = t[np.isfinite(t)]
    if not len(ts):
        return head + "</svg>"
    t0 = float(np.floor(ts.min()))
    x_lo, x_hi = ts.min() - t0, ts.max() - t0
    pad = max((x_hi - x_lo) * 0.04, 0.5)
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi = float(ys.min()), float(ys.max())
    ypad = max((y_hi - y_lo) * 0.08, 1.0)
    y_lo, y_hi = y_lo - ypad, y_hi + ypad
    L, R, T, B = 58, 12, 26, 36  # the legend sits in the top margin, off the data
    pw, ph = width - L - R, height - T - B

    def X(v):
        return L + (v - t0 - x_lo) / (x_hi - x_lo) * pw

    def Y(v):
        return T + (y_hi - v) / (y_hi - y_lo) * ph

    out = [head, f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="#fff" stroke="#bbb"/>']
    for v in _ticks(y_lo, y_hi):
        y = Y(v)
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{L - 5}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(v)}</text>')
    for v in _ticks(x_lo, x_hi, 6):
        x = L + (v - x_lo) / (x_hi - x_lo) * pw
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{T + ph}" stroke="#f2f2f2"/>'
                   f'<text x="{x:.1f}" y="{T + ph + 14}" text-anchor="middle" class="tick">{_fmt(v)}</text>')
    if y_lo < 0 < y_hi:
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{Y(0):.1f}" y2="{Y(0):.1f}" stroke="#999" '
                   'stroke-dasharray="4 3"/>')
    if trigger_mjd is not None and math.isfinite(trigger_mjd):
        x = X(trigger_mjd)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{T + ph}" stroke="#5b8def" stroke-width="1" '
                   'stroke-dasharray="2 2"/>')
    out.append(f'<text x="{L + pw / 2}" y="{height - 4}" text-anchor="middle" class="axis">MJD − {t0:.0f}</text>')
    out.append(f'<text x="12" y="{T + ph / 2}" text-anchor="middle" class="axis" '
               f'transform="rotate(-90 12 {T + ph / 2})">flux (µJy)</text>')
    bands_present = []
    for b in sorted(set(band), key=lambda s: "ugrizy".find(s) if s in "ugrizy" else 9):
        col = BAND_COLOURS.get(b, "#555")
        sel = band == b
        bands_present.append((b, col))
        for i in np.flatnonzero(sel):
            if not math.isfinite(t[i]):
                continue
            x = X(t[i])
            if k[i] == 2:
                if math.isfinite(ylim[i]):
                    y = Y(ylim[i])
                    out.append(f'<path d="M{x - 4:.1f},{y - 3:.1f} L{x + 4:.1f},{y - 3:.1f} L{x:.1f},{y + 4:.1f} Z" '
                               f'fill="none" stroke="{col}" opacity="0.6" class="ul"><title>{escape(b)} '
                               f'MJD {t[i]:.3f}: 5σ limit {ylim[i]:.1f} µJy</title></path>')
                continue
            if not math.isfinite(f[i]):
                continue
            y = Y(f[i])
            if math.isfinite(e[i]):
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y(f[i] - e[i]):.1f}" y2="{Y(f[i] + e[i]):.1f}" '
                           f'stroke="{col}" opacity="0.7"/>')
            tip = (f'<title>{escape(b)} MJD {t[i]:.3f}: {f[i]:.1f} ± {e[i]:.1f} µJy '
                   f'({["detection", "previous", "limit", "forced"][k[i]]})</title>')
            if k[i] == 3:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#fff" stroke="{col}" class="fp">{tip}'
                           '</circle>')
            else:
                r, stroke = (5, ' stroke="#000" stroke-width="1.2"') if k[i] == 0 else (3.5, "")
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{col}"{stroke} class="det">{tip}'
                           '</circle>')
    lx = L + 4
    for b, col in bands_present:
        out.append(f'<circle cx="{lx}" cy="{T - 12}" r="4" fill="{col}"/>'
                   f'<text x="{lx + 7}" y="{T - 8}" class="legend">{escape(b)}</text>')
        lx += 30
    out.append(f'<text x="{lx + 4}" y="{T - 8}" class="legend">● detection (black ring: this alert)   ○ forced   '
               '▽ 5σ upper limit</text>')
    out.append("</svg>")
    return "".join(out)


def sparkline_svg(spark_json: str | None, width: int = 80, height: int = 20) -> str:
    """The list's tiny light curve from the pre-computed points (see ``sparkline_points``)."""
    import json

    from markupsafe import escape

    pts = json.loads(spark_json) if spark_json else {}
    out = [f'<svg class="spark" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}">']
    for b, p in pts.items():
        col = BAND_COLOURS.get(b, "#555")
        if " " in p:
            out.append(f'<polyline points="{escape(p)}" fill="none" stroke="{col}" stroke-width="1.2"/>')
        for xy in p.split(" ")[-1:] if " " in p else p.split(" "):
            x, y = xy.split(",")
            out.append(f'<circle cx="{escape(x)}" cy="{escape(y)}" r="1.8" fill="{col}"/>')
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2 + 3}" text-anchor="middle" class="tick">—</text>')
    out.append("</svg>")
    return "".join(out)


# ----------------------------------------------------------------------------------- helpers


def archive_links(ra: float, dec: float, object_id: str, survey: str) -> list:
    """``(name, url)`` pairs for external archives at these coordinates (plain links)."""
    from urllib.parse import quote

    links = [
        ("Legacy Survey", f"https://www.legacysurvey.org/viewer?ra={ra:.6f}&dec={dec:.6f}&layer=ls-dr10&zoom=16"
                          f"&mark={ra:.6f},{dec:.6f}"),
        ("SIMBAD", f"https://simbad.cds.unistra.fr/simbad/sim-coo?Coord={ra:.6f}%20{dec:+.6f}&CooFrame=ICRS"
                   "&Radius=10&Radius.unit=arcsec"),
        ("TNS", f"https://www.wis-tns.org/search?ra={ra:.6f}&decl={dec:.6f}&radius=10&coords_unit=arcsec"),
        ("PS1", f"https://ps1images.stsci.edu/cgi-bin/ps1cutouts?pos={ra:.6f}%20{dec:+.6f}&filter=color"),
        ("NED", f"https://ned.ipac.caltech.edu/conesearch?coordinates={ra:.6f}d%20{dec:+.6f}d&radius=0.25"),
    ]
    if survey == "ztf":
        links += [("ALeRCE", f"https://alerce.online/object/{quote(object_id)}"),
                  ("Fink", f"https://fink-portal.org/{quote(object_id)}")]
    return links


def mjd_to_iso(mjd: float | None) -> str:
    """``YYYY-MM-DD HH:MM`` (UTC, leap seconds ignored) of an MJD, or an em dash."""
    if mjd is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime((mjd - MJD_UNIX_EPOCH) * 86400.0))


def query_from_args(args) -> ListQuery:
    """Build a :class:`ListQuery` from request arguments (invalid values are ignored)."""

    def flt(name):
        try:
            v = float(args.get(name, ""))
        except ValueError:
            return None
        return v if math.isfinite(v) else None

    def intg(name, default):
        try:
            return int(args.get(name, default))
        except ValueError:
            return default

    return ListQuery(
        stage=args.get("stage") if args.get("stage") in STAGES else None,
        min_p_real=flt("min_p_real"), min_p_extragalactic=flt("min_p_extragalactic"), min_p_fast=flt("min_p_fast"),
        sky=args.get("sky") if args.get("sky") in ("galactic", "extragalactic") else "all",
        sky_by="score" if args.get("sky_by") == "score" else "latitude",
        b_cut=flt("b_cut") if flt("b_cut") is not None else 15.0,
        sort=args.get("sort") if args.get("sort") in SORTS else "priority",
        show_snoozed=args.get("show_snoozed") == "1", hide_vetted=args.get("hide_vetted") == "1",
        hide_known_sso=args.get("hide_known_sso") == "1",
        page=min(10**6, max(1, intg("page", 1))), per_page=min(200, max(5, intg("per_page", 50))),
    )


def query_args(q: ListQuery, **override) -> dict:
    """Inverse of :func:`query_from_args`: the non-default values, for links."""
    default = ListQuery()
    out = {}
    for f in fields(ListQuery):
        v = override.get(f.name, getattr(q, f.name))
        if v == getattr(default, f.name) or v is None:
            continue
        out[f.name] = ("1" if v else "0") if isinstance(v, bool) else v
    return out


def _own_navigation() -> bool:
    """False when the browser says another site sent this request (``Sec-Fetch-Site``).

    Pages are GETs, and a GET must not change what the vetter has "seen": a link on another
    site (sent with the Lax session cookie) would otherwise mark objects as looked at. Browsers
    without Fetch Metadata send no header and count as the vetter's own navigation.
    """
    from flask import request

    return request.headers.get("Sec-Fetch-Site", "none").lower() in ("same-origin", "none")


def is_default_view(q: ListQuery) -> bool:
    """True for the unfiltered priority list (the only view whose ranks are remembered)."""
    return query_args(q, page=1, per_page=ListQuery().per_page) == {}


@dataclass(frozen=True)
class Settings:
    """What the app was started with."""

    db: str
    token: str
    clock: str = "stream"


# ----------------------------------------------------------------------------------- the app


#: How long a vetter's login lasts.
SESSION_HOURS = 12
#: Failed logins from one address within LOGIN_WINDOW_S before it must wait. They are kept in
#: the queue store, so every worker process (and every app on the same store) shares the limit.
LOGIN_FAILURES, LOGIN_WINDOW_S = 10, 600
#: Failed logins remembered at most (from all addresses; past it, the oldest are forgotten).
LOGIN_FAILURE_ROWS = 100_000


def create_app(db, token: str, clock: str = "stream", secure_cookie: bool = False, proxy_hops: int = 0,
               model=None):
    """The Flask application.

    Parameters
    ----------
    db : str or Path
        Queue SQLite file (created empty if absent, so the app can start before the service), or a
        ``postgresql://`` URL (its schema is created if absent).
    token : str
        Shared access token (required, non-empty).
    clock : {"stream", "wall"}
        Ages relative to the newest alert in the store, or to the wall clock.
    secure_cookie : bool
        Send the session cookie over HTTPS only (set it when the app sits behind TLS).
    proxy_hops : int
        Number of reverse proxies in front of the app whose ``X-Forwarded-For`` and
        ``X-Forwarded-Proto`` to trust (0: none). Behind a proxy, every request otherwise comes
        from the proxy's address, and one person's failed logins would lock everyone out.
    model : str or Path, optional
        Model directory (default: the shipped model) whose reference bank of conditions gives the
        object page's "typical conditions" scores, shown for alerts that model scored.

    Returns
    -------
    flask.Flask
    """
    import json

    from flask import Flask, Response, abort, g, jsonify, redirect, render_template, request, session, url_for
    from markupsafe import Markup

    if not token:
        raise ValueError("the queue web app needs an access token")
    settings = Settings(str(db), token, clock)
    first = QueueStore(settings.db)  # create the schema now, not on the first request
    analyze(first.conn)  # fresh planner statistics for whatever is already in the store
    first.close()

    app = Flask(__name__)
    if proxy_hops < 0:
        raise ValueError(f"proxy_hops: {proxy_hops} is negative")
    if proxy_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxy_hops, x_proto=proxy_hops)
    # Derived from the token: sessions survive a restart and work across workers, and changing the
    # token logs everyone out. A slow derivation, so that a stolen cookie does not let anyone test
    # guesses of a weak token quickly offline.
    app.secret_key = hashlib.pbkdf2_hmac("sha256", token.encode(), b"vigil-queue-session", 200_000)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=secure_cookie,
                      SESSION_COOKIE_NAME="vigil_queue", PERMANENT_SESSION_LIFETIME=SESSION_HOURS * 3600,
                      VIGIL=settings)
    token_tag = hmac.new(app.secret_key, b"tag", "sha256").hexdigest()[:16]
    scorer = _Scorer(model)

    def store() -> QueueStore:
        if "store" not in g:
            g.store = QueueStore(settings.db)
        return g.store

    @app.teardown_appcontext
    def _close(_exc):
        s = g.pop("store", None)
        if s is not None:
            s.close()

    def _json_error(message: str, status: int, headers=None):
        return Response(json.dumps({"error": message}), status, {"Content-Type": "application/json", **(headers or {})})

    # Wrong Bearer tokens this process could not record in the store (busy): counted here instead,
    # so that a long write elsewhere does not open a window for unlimited guessing.
    unrecorded: dict = {}

    def bearer_refusal(given: str):
        """None when the Bearer token is right; else the answer. A wrong token counts as a failed
        login, and an address with too many is refused, as on the login page, so the token cannot
        be guessed here without limit. A right one writes nothing: reads go on while the service
        holds the store's write lock."""
        address = request.remote_addr or "?"
        now = time.monotonic()
        mine = unrecorded[address] = [t for t in unrecorded.get(address, []) if now - t < LOGIN_WINDOW_S]
        if store().login_failures(address, LOGIN_WINDOW_S * 1000) + len(mine) >= LOGIN_FAILURES:
            return _json_error("too many failed logins from this address; try again later", 429)
        if hmac.compare_digest(given.encode(), token.encode()):
            return None
        try:
            store().begin_login(address, LOGIN_WINDOW_S * 1000, LOGIN_FAILURES, LOGIN_FAILURE_ROWS)
        except _busy_errors() as exc:
            app.logger.warning("failed token check counted in this process only, store busy: %r", exc)
            mine.append(now)
        return _json_error("wrong token", 401, {"WWW-Authenticate": 'Bearer realm="vigil-queue"'})

    @app.before_request
    def _auth():
        if request.endpoint in ("health", "login", "favicon"):
            return None
        logged_in = session.get("auth") == token_tag and session.get("vetter")
        # A login lasts SESSION_HOURS from the login itself: the cookie's own expiry is renewed by every
        # request, and an open list polls every 10 s, so by that alone a tab left open never logged out.
        if logged_in and time.time() * 1000 - float(session.get("login_ms") or 0) >= SESSION_HOURS * 3.6e6:
            session.clear()
            logged_in = False
        h = request.headers.get("Authorization", "")
        # A logged-in browser goes by its session when its Authorization header is not our token
        # (a proxy in front of the app may add its own, which would otherwise count as a guess).
        given = h[7:].strip() if h.startswith("Bearer ") else None
        ours = given is not None and hmac.compare_digest(given.encode(), token.encode())
        if given is not None and (ours or not logged_in):
            refused = bearer_refusal(given)
            if refused is not None:
                return refused
            g.vetter = (request.headers.get("X-Vetter") or "api").strip()[:80] or "api"
            g.via_bearer = True
            return None
        if logged_in:
            g.vetter = session["vetter"]
            g.via_bearer = False
            if request.method == "POST":  # cookie-authenticated writes must prove they came from our pages
                sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf", "")
                if not hmac.compare_digest(sent.encode(), session.get("csrf", "").encode()):
                    if "application/json" in request.headers.get("Accept", ""):  # the page's script shows it
                        return _json_error("your session changed (a new login, or it expired): reload the page; "
                                           "this was not saved", 403)
                    abort(403)
            return None
        if request.path.startswith("/api/") or request.path.startswith("/cutout/") or request.method != "GET" \
                or "application/json" in request.headers.get("Accept", ""):
            return _json_error("authentication required", 401, {"WWW-Authenticate": 'Bearer realm="vigil-queue"'})
        return redirect(url_for("login", next=request.full_path.rstrip("?")))

    @app.after_request
    def _headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        return resp

    @app.context_processor
    def _ctx():
        return {"vetter": g.get("vetter"), "csrf": session.get("csrf", ""), "keys": KEYS}

    @app.template_filter("score")
    def _score(v):
        return Markup('<span class="unscored">unscored</span>') if v is None else f"{v:.2f}"

    @app.template_filter("num")
    def _numf(v, fmt="{:.2f}"):
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)

    @app.template_filter("ms_iso")
    def _ms_iso(ms):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000.0))

    app.jinja_env.globals.update(sparkline_svg=lambda s: Markup(sparkline_svg(s)), mjd_to_iso=mjd_to_iso,
                                 SORTS=SORTS, STAGES=STAGES, KNOWN_SSO_ARCSEC=KNOWN_SSO_ARCSEC,
                                 type_words=type_words, extrapolated_text=extrapolated_text)

    def clocks() -> dict:
        """``survey → "now"``: the wall clock, or (stream clock) each survey's newest alert."""
        if settings.clock == "wall":
            return {}
        return store().survey_clocks()

    def now_of(clock: dict, survey) -> float:
        wall = time.time() / 86400.0 + MJD_UNIX_EPOCH
        return clock.get(survey, max(clock.values(), default=wall))

    @app.get("/favicon.ico")
    def favicon():
        # The pages carry an inline icon; error pages (Flask's) do not, and browsers then ask here.
        return Response(FAVICON_SVG, mimetype="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/health")
    def health():
        try:
            n = QueueStore(settings.db)
            n.conn.execute("SELECT 1").fetchone()
            n.close()
        except Exception as exc:  # noqa: BLE001 - health must answer, whatever went wrong
            return jsonify(status="error", detail=type(exc).__name__), 503
        return jsonify(status="ok")

    @app.route("/login", methods=["GET", "POST"])
    def login():
        error = None
        nxt = _local_path(request.values.get("next"))
        if request.method == "POST":
            name = (request.form.get("vetter") or "").strip()[:80]
            given = (request.form.get("token") or "").strip()
            if not name:
                return render_template("login.html", error="Please give your name (it is recorded with your "
                                       "decisions).", next=nxt), 401
            try:  # counted before the token is compared, so that a burst of guesses cannot outrun the count
                attempt = store().begin_login(request.remote_addr or "?", LOGIN_WINDOW_S * 1000, LOGIN_FAILURES,
                                              LOGIN_FAILURE_ROWS)
            except _busy_errors() as exc:  # the service holds the store's write lock: no guess goes unrecorded
                app.logger.warning("login not checked, store busy: %r", exc)
                return render_template("login.html", error="The queue store is busy; try again in a moment.",
                                       next=nxt), 503
            if attempt is None:
                return render_template("login.html", error="Too many failed logins; try again later.",
                                       next=nxt), 429
            if not hmac.compare_digest(given.encode(), token.encode()):
                error = "Wrong token."
            else:
                try:
                    store().login_succeeded(attempt)
                except _busy_errors() as exc:  # it stays counted as a failure; the vetter still gets in
                    app.logger.warning("successful login left counted, store busy: %r", exc)
                session.clear()
                session.update(auth=token_tag, vetter=name, csrf=secrets.token_urlsafe(16),
                               login_ms=int(time.time() * 1000))
                session.permanent = True
                return redirect(nxt)
        return render_template("login.html", error=error, next=nxt), (401 if error else 200)

    @app.post("/logout")
    def logout():
        session.clear()
        return redirect(url_for("login"))

    @app.get("/")
    def index():
        q = query_from_args(request.args)
        page = store().list_objects(q, vetter=g.vetter)
        if page.page > max(page.n_pages, 1):  # past the end (the list shrank, or a typed URL): its last page
            return redirect(url_for("index", **query_args(q, page=max(page.n_pages, 1))))
        clock = clocks()
        default_view = is_default_view(q)
        rows = []
        for i, r in enumerate(page.rows):
            rank = (page.page - 1) * page.per_page + i + 1
            seen = page.seen.get(r["object_id"])
            flag, moved = "", None
            if seen is None:
                flag = "new"
            elif seen["seen_alert_id"] != r["latest_alert_id"]:
                flag = "new data"
            if seen is not None and default_view and seen["seen_rank"]:
                moved = seen["seen_rank"] - rank  # > 0: moved up
            dprio = None  # what new data did to the priority (the list's ageing alone moves it down)
            if flag == "new data" and seen["seen_priority"] is not None and r["priority"] is not None:
                dprio = r["priority"] - seen["seen_priority"]
            now = now_of(clock, r["survey"])
            rows.append(dict(r, rank=rank, flag=flag, moved=moved, dprio=dprio,
                             age=(now - r["first_mjd"]) if r["first_mjd"] is not None else None,
                             since_last=now - r["latest_mjd"]))
        if _own_navigation():
            store().record_views(g.vetter, page.rows, first_rank=(page.page - 1) * page.per_page + 1,
                                 with_rank=default_view)
        base = query_args(q, page=1)
        qs = urlencode(base)
        oqs = urlencode(query_args(q, page=page.page))  # an object's page leads back to this page
        return render_template("list.html", page=page, rows=rows, q=q, qs=qs, oqs=oqs, base=base,
                               prev_url=(url_for("index", **query_args(q, page=page.page - 1))
                                         if page.page > 1 else None),
                               next_url=(url_for("index", **query_args(q, page=page.page + 1))
                                         if page.page < page.n_pages else None),
                               loaded_ms=int(time.time() * 1000), clocks=clock, clock=settings.clock,
                               now_mjd=now_of(clock, None))

    @app.get("/object/<path:object_id>")  # (path: an id may hold "/")
    def object_page(object_id):
        obj = store().get_object(object_id)
        if obj is None:
            abort(404)
        q = query_from_args(request.args)
        qs = urlencode(query_args(q, page=1))
        # "↑ list" opens the list page this object is on now (j/k may have crossed pages), else
        # the one it was opened from (a snooze or "hide vetted" may have taken it off the list).
        on = store().page_of(object_id, q)
        lqs = urlencode(query_args(q, page=on if on is not None else q.page))
        nxt, prv = store().neighbour(object_id, q, 1), store().neighbour(object_id, q, -1)
        if _own_navigation():
            store().record_views(g.vetter, [obj], with_rank=False)
        rec = obj["record"] or {}
        feats = rec.get("features") or {}
        lc = obj["lightcurve"]
        trig = rec.get("event_mjd")
        explanation_text = rec.get("explanation_text") or {}
        types = sorted((rec.get("source_type_probabilities") or {}).items(), key=lambda kv: -kv[1])
        types = [(type_words(t, obj["ss_distance"]), p) for t, p in types[:3] if p >= 0.01]
        # Scores resting on labels that hardly reach alerts like this one (flagged, not changed).
        extrap = list(rec.get("extrapolated") or [])
        support = [p for s, p in (rec.get("label_propensity") or {}).items() if s in extrap]
        return render_template(
            "object.html", obj=obj, rec=rec, feats=feats, qs=qs, typical=scorer.typical(rec),
            svg_raw=Markup(lightcurve_svg(lc, "raw", trigger_mjd=trig)),
            svg_corr=Markup(lightcurve_svg(lc, "corrected", trigger_mjd=trig)),
            explanation_text=explanation_text, links=archive_links(obj["ra"], obj["dec"], object_id, obj["survey"]),
            next_url=url_for("object_page", object_id=nxt) + (f"?{qs}" if qs else "") if nxt else None,
            prev_url=url_for("object_page", object_id=prv) + (f"?{qs}" if qs else "") if prv else None,
            list_url=url_for("index") + (f"?{lqs}" if lqs else ""), now_mjd=now_of(clocks(), obj["survey"]),
            feature_rows=sorted(feats.items()), types=types, extrap=extrap,
            extrap_p=min(support) if support else None,
        )

    @app.get("/cutout/<int:alert_id>/<kind>.png")
    def cutout(alert_id, kind):
        if kind not in ("science", "template", "difference") or not 0 < alert_id < 2**63:
            abort(404)
        data = store().cutout(alert_id, kind)
        if data is None:
            abort(404)
        try:
            png = cutout_png(data, kind)
        except (OSError, ValueError, TypeError) as exc:
            app.logger.warning("cutout %s/%s unreadable: %r", alert_id, kind, exc)
            abort(415)
        return Response(png, mimetype="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @app.post("/api/decision")
    def decision():
        body = request.get_json(silent=True) or request.form
        if not hasattr(body, "get"):
            return jsonify(error="expected a JSON object"), 400
        object_id = body.get("object_id", "")
        action = body.get("action", "")
        alert_id = body.get("alert_id")
        if not (isinstance(object_id, str) and isinstance(action, str)):
            return jsonify(error="object_id and action must be strings"), 400
        note = body.get("note")
        if not isinstance(note, (str, type(None))):
            return jsonify(error="note must be a string"), 400
        if alert_id in (None, ""):
            alert_id = None
        elif isinstance(alert_id, str) and alert_id.strip().isdecimal():  # ("²" is a digit, not a decimal)
            alert_id = int(alert_id)
        elif isinstance(alert_id, bool) or not isinstance(alert_id, int):  # 1.7, 1e20, [1], {...}
            return jsonify(error="alert_id must be a whole number"), 400
        if alert_id is not None and not 0 < alert_id < 2**63:
            return jsonify(error="alert_id must be a positive 64-bit integer"), 400
        try:
            d = store().record_decision(object_id, action, g.vetter, alert_id, note or "")
        except (KeyError, ValueError) as exc:
            # KeyError's str() quotes its message: take the message itself
            return jsonify(error=str(exc.args[0]) if exc.args else str(exc)), 400
        except _busy_errors() as exc:  # another writer held the store past the busy timeout: nothing saved
            app.logger.warning("decision not saved, store busy: %r", exc)
            return jsonify(error="the queue store is busy; the decision was not saved, try again"), 503
        if request.is_json:
            return jsonify(decision_id=d.decision_id, object_id=d.object_id, alert_id=d.alert_id, vetter=d.vetter,
                           decided_ms=d.decided_ms, action=d.action)
        return redirect(_local_path(body.get("back")) if body.get("back") else
                        url_for("object_page", object_id=object_id))

    @app.post("/api/decision/<int:decision_id>/withdraw")
    def withdraw(decision_id):
        """Withdraw one decision (kept in the log, marked); JSON with the object's vetting state after."""
        if not 0 < decision_id < 2**63:  # (a 64-bit SQL integer)
            return jsonify(error=f"unknown decision {decision_id}"), 404
        try:
            state = store().withdraw_decision(decision_id, g.vetter)
        except KeyError as exc:
            return jsonify(error=str(exc.args[0]) if exc.args else str(exc)), 404
        except ValueError as exc:
            return jsonify(error=str(exc)), 409
        except _busy_errors() as exc:
            app.logger.warning("withdrawal not saved, store busy: %r", exc)
            return jsonify(error="the queue store is busy; nothing was withdrawn, try again"), 503
        if request.is_json or "application/json" in request.headers.get("Accept", ""):
            return jsonify(state)
        back = request.form.get("back")
        return redirect(_local_path(back) if back else url_for("object_page", object_id=state["object_id"]))

    @app.get("/api/changes")
    def changes():
        try:
            since = min(max(int(request.args.get("since", "0")), 0), 2**62)  # a 64-bit SQL integer
        except ValueError:
            since = 0
        return jsonify(changed=store().changes_since(since), objects=store().n_objects(),
                       now_ms=int(time.time() * 1000))

    @app.get("/api/actions")
    def actions():
        return jsonify(actions=sorted(ACTIONS), keys=KEYS)

    return app


def queue_token(token: str | None = None, token_file=None) -> str | None:
    """The access token: ``token``, else the contents of ``token_file``, else
    ``$VIGIL_QUEUE_TOKEN``; None when there is none (callers decide what that means).

    What the operator names wins over what the environment happens to hold; an empty
    token file is an error, not "no token".
    """
    import os
    from pathlib import Path

    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"token file {token_file}: cannot be read ({e})") from None
        if not token:
            raise ValueError(f"token file {token_file} is empty")
    return token or os.environ.get("VIGIL_QUEUE_TOKEN") or None


def wsgi_app():
    """The app for an external WSGI server, configured from the environment.

    ``VIGIL_QUEUE_DB`` (SQLite file or ``postgresql://`` URL), ``VIGIL_QUEUE_TOKEN`` or
    ``VIGIL_QUEUE_TOKEN_FILE``, and optionally ``VIGIL_QUEUE_CLOCK`` (``stream``/``wall``) and
    ``VIGIL_QUEUE_SECURE_COOKIE`` (``1`` behind HTTPS) and ``VIGIL_QUEUE_PROXY_HOPS`` (the
    number of reverse proxies whose forwarded-for headers to trust, default 0).
    For example ``gunicorn -w 4 'stream.web:wsgi_app()'``.
    """
    import os

    db = os.environ.get("VIGIL_QUEUE_DB")
    if not db:
        raise ValueError("VIGIL_QUEUE_DB: not set (the queue store: SQLite file or postgresql:// URL)")
    token = queue_token(token_file=os.environ.get("VIGIL_QUEUE_TOKEN_FILE"))
    if not token:
        raise ValueError("VIGIL_QUEUE_TOKEN: not set (nor VIGIL_QUEUE_TOKEN_FILE); the app never serves without one")
    clock = os.environ.get("VIGIL_QUEUE_CLOCK", "stream")
    if clock not in ("stream", "wall"):
        raise ValueError(f"VIGIL_QUEUE_CLOCK: must be 'stream' or 'wall', not {clock!r}")
    secure = os.environ.get("VIGIL_QUEUE_SECURE_COOKIE", "0")
    if secure not in ("0", "1"):
        raise ValueError(f"VIGIL_QUEUE_SECURE_COOKIE: must be 0 or 1, not {secure!r}")
    hops = os.environ.get("VIGIL_QUEUE_PROXY_HOPS", "0")
    if not hops.isdigit():
        raise ValueError(f"VIGIL_QUEUE_PROXY_HOPS: must be a count of proxies (0, 1, ...), not {hops!r}")
    return create_app(db, token=token, clock=clock, secure_cookie=secure == "1", proxy_hops=int(hops),
                      model=os.environ.get("VIGIL_QUEUE_MODEL") or None)


def _busy_errors() -> tuple:
    """What a store raises when a write waited for the lock and gave up (SQLite, PostgreSQL)."""
    from stream.queue import _errors

    return _errors("LockNotAvailable")


class _Scorer:
    """The model behind the object page's "typical conditions" scores, loaded on first use."""

    def __init__(self, directory=None):
        import threading

        from models.scorer import AlertScorer

        # A named directory is read now, so that a wrong one fails at start, not on a vetter's page.
        self.model = AlertScorer.load(directory) if directory is not None else None
        self._lock = threading.Lock()  # one load, and one booster set-up, among the worker's threads

    def typical(self, rec: dict) -> dict:
        """Typical-conditions scores of one annotation: ``{"scores": {score: p}, "n": rows}`` or ``{"why": ...}``.

        A line to read beside the scores: whatever goes wrong here says so instead of failing the page.
        """
        import pandas as pd

        from models.features import FEATURES
        from models.scorer import AlertScorer, default_scorer

        if rec.get("status") != "scored":
            return {"why": "unscored"}
        with self._lock:
            if self.model is None:
                try:
                    self.model = default_scorer()
                except ValueError as exc:  # (the service would not have started with it: say so, once)
                    log.warning("typical-conditions scores: %s", exc)
                    self.model = False
            model = self.model
            if not isinstance(model, AlertScorer):  # no shipped model, or a rule given in code
                return {"why": "no alert model to read them from"}
            if rec.get("model_version") != model.model_version:
                return {"why": f"scored by {rec.get('model_version')}; this page has {model.model_version}"}
            feats = rec.get("features") or {}
            try:
                out = model.standardised_scores(pd.DataFrame([{f: feats.get(f) for f in FEATURES}], dtype=float))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("typical-conditions scores failed for alert %s: %r", rec.get("alert_id"), exc)
                return {"why": "they could not be computed for this alert"}
        if out is None:
            return {"why": f"{model.model_version} keeps no reference conditions"}
        return {"scores": {s: float(v[0]) for s, v in out.items()}, "n": len(model.metadata["condition_bank"]["rows"])}


def gunicorn_base():
    """gunicorn's application base class, or :class:`stream.MissingExtra` saying how to install it."""
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError as exc:
        raise MissingExtra("--workers needs gunicorn: pip install 'vigil[serve]'") from exc
    return BaseApplication


def serve_workers(app, host: str, port: int, workers: int, threads: int = 4) -> None:
    """Serve ``app`` with gunicorn: ``workers`` processes of ``threads`` threads (blocks until stopped).

    The production counterpart of Flask's built-in server, which is for one user on a laptop.
    Sessions work across workers because the signing key derives from the token.
    """
    BaseApplication = gunicorn_base()

    class _Server(BaseApplication):
        def load_config(self):
            for k, v in {"bind": f"{host}:{port}", "workers": workers, "threads": threads, "accesslog": "-",
                         "graceful_timeout": 10}.items():
                self.cfg.set(k, v)

        def load(self):
            return app

    _Server().run()
