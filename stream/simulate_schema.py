"""The ZTF alert schema 4.02, as the simulator writes it.

Field names, types, nullability and order are interface facts of the public ZTF alert
format; they are written here in a compact form (``name:code`` with ``d`` double, ``f``
float, ``i`` int, ``l`` long, ``s`` string, ``b`` bytes, and a trailing ``?`` for
``["null", type]`` with default null) so that the simulator needs no schema files. The
record names and nesting (``ztf.alert`` with ``ztf.alert.candidate`` etc.) match the
survey's, so a consumer with the official schema reads these alerts unchanged.
"""

from __future__ import annotations

SCHEMA_VERSION = "4.02"

_CUTOUT = "fileName:s stampData:b"

_CANDIDATE = """
jd:d fid:i pid:l diffmaglim:f? pdiffimfilename:s? programpi:s? programid:i candid:l isdiffpos:s
tblid:l? nid:i? rcid:i? field:i? xpos:f? ypos:f? ra:d dec:d magpsf:f sigmapsf:f chipsf:f? magap:f?
sigmagap:f? distnr:f? magnr:f? sigmagnr:f? chinr:f? sharpnr:f? sky:f? magdiff:f? fwhm:f? classtar:f?
mindtoedge:f? magfromlim:f? seeratio:f? aimage:f? bimage:f? aimagerat:f? bimagerat:f? elong:f?
nneg:i? nbad:i? rb:f? ssdistnr:f? ssmagnr:f? ssnamenr:s? sumrat:f? magapbig:f? sigmagapbig:f? ranr:d
decnr:d sgmag1:f? srmag1:f? simag1:f? szmag1:f? sgscore1:f? distpsnr1:f? ndethist:i ncovhist:i
jdstarthist:d? jdendhist:d? scorr:d? tooflag:i? objectidps1:l? objectidps2:l? sgmag2:f? srmag2:f?
simag2:f? szmag2:f? sgscore2:f? distpsnr2:f? objectidps3:l? sgmag3:f? srmag3:f? simag3:f? szmag3:f?
sgscore3:f? distpsnr3:f? nmtchps:i rfid:l jdstartref:d jdendref:d nframesref:i rbversion:s dsnrms:f?
ssnrms:f? dsdiff:f? magzpsci:f? magzpsciunc:f? magzpscirms:f? nmatches:i clrcoeff:f? clrcounc:f?
zpclrcov:f? zpmed:f? clrmed:f? clrrms:f? neargaia:f? neargaiabright:f? maggaia:f? maggaiabright:f?
exptime:f? drb:f? drbversion:s
"""

# A previous candidate is a candidate with most fields nullable: non-detections carry
# only the exposure-level ones (jd, fid, pid, diffmaglim, zero point, ...).
_PRV_CANDIDATE = """
jd:d fid:i pid:l diffmaglim:f? pdiffimfilename:s? programpi:s? programid:i candid:l? isdiffpos:s?
tblid:l? nid:i? rcid:i? field:i? xpos:f? ypos:f? ra:d? dec:d? magpsf:f? sigmapsf:f? chipsf:f?
magap:f? sigmagap:f? distnr:f? magnr:f? sigmagnr:f? chinr:f? sharpnr:f? sky:f? magdiff:f? fwhm:f?
classtar:f? mindtoedge:f? magfromlim:f? seeratio:f? aimage:f? bimage:f? aimagerat:f? bimagerat:f?
elong:f? nneg:i? nbad:i? rb:f? ssdistnr:f? ssmagnr:f? ssnamenr:s? sumrat:f? magapbig:f?
sigmagapbig:f? ranr:d? decnr:d? scorr:d? magzpsci:f? magzpsciunc:f? magzpscirms:f? clrcoeff:f?
clrcounc:f? rbversion:s
"""

_FP_HIST = """
field:i? rcid:i? fid:i pid:l rfid:l sciinpseeing:f? scibckgnd:f? scisigpix:f? magzpsci:f?
magzpsciunc:f? magzpscirms:f? clrcoeff:f? clrcounc:f? exptime:f? adpctdif1:f? adpctdif2:f?
diffmaglim:f? programid:i jd:d forcediffimflux:f? forcediffimfluxunc:f? procstatus:s? distnr:f?
ranr:d decnr:d magnr:f? sigmagnr:f? chinr:f? sharpnr:f?
"""

_TYPES = {"d": "double", "f": "float", "i": "int", "l": "long", "s": "string", "b": "bytes"}


def parse_fields(spec: str) -> list[tuple[str, str, bool]]:
    """``"name:f? other:l"`` → ``[("name", "float", True), ("other", "long", False)]``."""
    out = []
    for tok in spec.split():
        name, code = tok.split(":")
        out.append((name, _TYPES[code.rstrip("?")], code.endswith("?")))
    return out


def record_schema(name: str, fields) -> dict:
    """Avro record schema from ``(name, type, nullable)`` tuples (namespace ``ztf.alert``)."""
    out = []
    for fname, ftype, nullable in fields:
        if nullable:
            out.append({"name": fname, "type": ["null", ftype], "default": None})
        else:
            out.append({"name": fname, "type": ftype})
    return {"type": "record", "name": name, "namespace": "ztf.alert", "fields": out}


def _record(name: str, spec: str) -> dict:
    return record_schema(name, parse_fields(spec))


CANDIDATE_FIELDS = parse_fields(_CANDIDATE)
PRV_CANDIDATE_FIELDS = parse_fields(_PRV_CANDIDATE)
FP_HIST_FIELDS = parse_fields(_FP_HIST)


def ztf_alert_schema() -> dict:
    """The full ZTF 4.02 alert schema as one self-contained JSON-able dict."""

    def array_of(rec):
        return ["null", {"type": "array", "items": rec}]

    cutout = _record("cutout", _CUTOUT)
    return {
        "type": "record",
        "name": "alert",
        "namespace": "ztf",
        "doc": "ZTF alert schema 4.02 (written by the Vigil simulator)",
        "version": SCHEMA_VERSION,
        "fields": [
            {"name": "schemavsn", "type": "string"},
            {"name": "publisher", "type": "string"},
            {"name": "objectId", "type": "string"},
            {"name": "candid", "type": "long"},
            {"name": "candidate", "type": _record("candidate", _CANDIDATE)},
            {"name": "prv_candidates", "type": array_of(_record("prv_candidate", _PRV_CANDIDATE)), "default": None},
            {"name": "fp_hists", "type": array_of(_record("fp_hist", _FP_HIST)), "default": None},
            {"name": "cutoutScience", "type": ["null", cutout], "default": None},
            {"name": "cutoutTemplate", "type": ["null", "ztf.alert.cutout"], "default": None},
            {"name": "cutoutDifference", "type": ["null", "ztf.alert.cutout"], "default": None},
        ],
    }
