"""The Bonsai workflows in plugins/bonsai/: well-formed, built only from verified Bonsai elements,
and speaking rtnf's real wire formats.

Bonsai does not run here, so each workflow is checked as XML against an allow-list of the
namespaces, node types and property elements taken from RIGS.md and from the package sources and
published workflows listed in plugins/bonsai/README.md ("Where the facts come from"). The
messages are checked against rtnf itself: a real `ZmqSink` publishes `decoded` and `control`
messages that are parsed with a Python rendering of Bonsai's Parse node; the CSV lines the
behaviour workflow's Format node builds are published, as the workflow's Publisher frames them,
to a real `ZmqSource`; the LSL variant's stream is resolved by a real `LslSource`. Sockets stay on
127.0.0.1 (LSL on loopback discovery, tests/conftest.py).
"""

from __future__ import annotations

import math
import re
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq

from rtnf.config import LslSourceConfig, SourceConfig, ZmqOutputConfig, load_config
from rtnf.rt.rules import Rules
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.sinks import ZmqSink
from rtnf.stream.sources import Batch, LslSource, ZmqSource
from rtnf.stream.window_output import STAGES, OutputLayout, TelemetrySample, WindowOutput
from rtnf.stream.zmq_messages import TOPICS

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "bonsai"
WORKFLOWS = sorted(PLUGIN.glob("*.bonsai"))
RULES_FILE = PLUGIN / "closed-loop.yaml"
WAIT_S = 5.0
RTNF_TOPICS = ("decoded", "predicted", "control", "telemetry")  # rtnf.stream.sinks docstring

# ---------------------------------------------------------------------------------------------
# Allow-list of XML namespaces, node types and property elements (sources: README.md)
# ---------------------------------------------------------------------------------------------

W = "https://bonsai-rx.org/2018/workflow"  # RIGS.md; Bonsai.Core Constants.XmlNamespace
XSI = "http://www.w3.org/2001/XMLSchema-instance"
RX = "clr-namespace:Bonsai.Reactive;assembly=Bonsai.Core"  # Bonsai.Core ReactiveXmlNamespace
ZMQ = "clr-namespace:Bonsai.ZeroMQ;assembly=Bonsai.ZeroMQ"  # RIGS.md; bonsai-rx/zeromq docs
GL = "clr-namespace:Bonsai.Shaders;assembly=Bonsai.Shaders"  # bonsai-rx/docs bonvision-render
RES = "clr-namespace:Bonsai.Resources;assembly=Bonsai.System"  # bonsai-rx/docs bonvision-render
LSL = "clr-namespace:EmotionalCities.Lsl;assembly=EmotionalCities.Lsl"  # pluma-experiments EEG

NAMESPACES = {W, XSI, RX, ZMQ, GL, RES, LSL}


def _w(*names: str) -> frozenset[tuple[str, str]]:
    return frozenset((W, name) for name in names)


def _in(namespace: str, *names: str) -> frozenset[tuple[str, str]]:
    return frozenset((namespace, name) for name in names)


# Expression xsi:type -> the child elements it may hold. Sources: Parse (Pattern, Separator:
# Bonsai.Core ParseBuilder; a published Parse node in emotional-cities/pluma-experiments), Format
# (Format, Selector: FormatBuilder; bonsai-rx/docs expressions-format-example), MemberSelector,
# PropertyMapping, SubscribeSubject, WorkflowInput/Output, GroupWorkflow, Equal with an Operand,
# rx:PublishSubject, rx:Condition (bonsai-rx/docs workflows, Bonsai 2.8.5 / 2.9.0), and
# lsl:StreamOutlet (EmotionalCities.Lsl StreamOutlet.cs; pluma-experiments EEG.bonsai).
EXPRESSIONS: dict[tuple[str, str], frozenset[tuple[str, str]] | None] = {
    (W, "Combinator"): _w("Combinator"),
    (W, "MemberSelector"): _w("Selector"),
    (W, "Parse"): _w("Pattern", "Separator"),
    (W, "Format"): _w("Format", "Selector"),
    (W, "PropertyMapping"): _w("PropertyMappings"),
    (W, "IncludeWorkflow"): None,  # children checked against INCLUDES
    (W, "SubscribeSubject"): _w("Name"),
    (W, "WorkflowInput"): _w("Name"),
    (W, "WorkflowOutput"): frozenset(),
    (W, "GroupWorkflow"): _w("Name", "Workflow"),
    (W, "Equal"): _w("Operand"),
    (RX, "PublishSubject"): _w("Name"),
    (RX, "Condition"): _w("Name", "Workflow"),
    (LSL, "StreamOutlet"): _in(LSL, "Name", "ContentType", "ChannelCount", "Selector",
                               "SampleRate", "SourceId"),
}

# Combinator xsi:type -> its property elements. Sources: Bonsai.ZeroMQ 0.2.0 Subscriber.cs,
# Publisher.cs, ConvertToString.cs (ConnectionString, Topic); rx:Timer, rx:Zip, rx:Merge and
# FloatProperty (bonsai-rx/docs and BonVision DrawGratings.bonsai); gl:CreateWindow,
# gl:RenderFrame, res:LoadResources (bonsai-rx/docs bonvision-render.bonsai, Bonsai 2.8.5);
# lsl:Timestamp (EmotionalCities.Lsl Timestamp.cs; pluma-experiments EEG.bonsai).
COMBINATORS: dict[tuple[str, str], frozenset[tuple[str, str]]] = {
    (ZMQ, "Subscriber"): _in(ZMQ, "ConnectionString", "Topic"),
    (ZMQ, "Publisher"): _in(ZMQ, "ConnectionString", "Topic"),
    (ZMQ, "ConvertToString"): frozenset(),
    (RX, "Timer"): _in(RX, "DueTime", "Period"),
    (RX, "Zip"): frozenset(),
    (RX, "Merge"): frozenset(),
    (W, "FloatProperty"): _w("Value"),
    (GL, "CreateWindow"): _in(GL, "Width", "Height", "VSync", "SwapSync", "ClearColor",
                              "ClearMask", "CursorVisible", "Location", "WindowBorder",
                              "WindowState", "DisplayDevice", "TargetRenderFrequency",
                              "TargetUpdateFrequency", "RenderState", "GraphicsMode"),
    (GL, "RenderFrame"): frozenset(),
    (RES, "LoadResources"): frozenset(),
    (LSL, "Timestamp"): frozenset(),
}

OPERANDS = {(W, "StringProperty"): _w("Value")}  # ExpressionBuilder.GetWorkflowPropertyType

# IncludeWorkflow Path -> the externalized properties it may set (bonvision/BonVision
# BonVision/Primitives/DrawGratings.bonsai's ExternalizedMapping names; bonsai-rx/docs
# bonvision-render.bonsai for the two set-up includes).
DRAW_GRATINGS = "BonVision:Primitives.DrawGratings.bonsai"
INCLUDES: dict[str, frozenset[tuple[str, str]]] = {
    "BonVision:Primitives.BonVisionResources.bonsai": frozenset(),
    "BonVision:Environment.NormalizedView.bonsai": frozenset(),
    DRAW_GRATINGS: _w("LocationX", "LocationY", "Layer", "Angle", "SpatialFrequency",
                      "TemporalFrequency", "Phase", "SquareWave", "Contrast", "Threshold",
                      "Radius", "Aperture", "Opacity", "ExtentX", "ExtentY"),
}

# ---------------------------------------------------------------------------------------------
# Reading workflows
# ---------------------------------------------------------------------------------------------


def qname(tag: str) -> tuple[str, str]:
    """'{uri}local' -> (uri, local)."""
    match = re.fullmatch(r"\{([^}]*)\}(.*)", tag)
    assert match, f"element {tag!r} has no namespace"
    return match.group(1), match.group(2)


@dataclass
class Graph:
    """One Workflow element: its Expression nodes and (From, To, Label) edges."""

    nodes: list[ET.Element]
    edges: list[tuple[int, int, str]]

    def successors(self, index: int) -> list[tuple[int, str]]:
        return [(to, label) for origin, to, label in self.edges if origin == index]

    def predecessors(self, index: int) -> list[tuple[int, str]]:
        return [(origin, label) for origin, to, label in self.edges if to == index]


@dataclass
class Bonsai:
    path: Path
    root: ET.Element
    prefixes: dict[str, str]  # prefix -> namespace URI, as declared in the file

    def xsi_type(self, element: ET.Element) -> tuple[str, str] | None:
        value = element.get(f"{{{XSI}}}type")
        if value is None:
            return None
        prefix, _, local = value.rpartition(":")
        assert prefix in self.prefixes, f"{self.path.name}: xsi:type {value!r}: undeclared prefix"
        return self.prefixes[prefix], local

    @property
    def graph(self) -> Graph:
        return graph_of(self.root.find(f"{{{W}}}Workflow"))

    def nodes_of_type(self, kind: tuple[str, str]) -> list[tuple[Graph, int]]:
        """Every (graph, index) whose node, or whose Combinator, has xsi:type `kind`."""
        found = []
        for graph in all_graphs(self.graph):
            for index, node in enumerate(graph.nodes):
                if kind in (self.xsi_type(node), self.combinator_type(node)):
                    found.append((graph, index))
        return found

    def combinator_type(self, node: ET.Element) -> tuple[str, str] | None:
        combinator = node.find(f"{{{W}}}Combinator")
        return None if combinator is None else self.xsi_type(combinator)


def load(path: Path) -> Bonsai:
    prefixes = {}
    for _event, (prefix, uri) in ET.iterparse(path, events=("start-ns",)):
        assert prefixes.get(prefix, uri) == uri, f"{path.name}: prefix {prefix!r} redeclared"
        prefixes[prefix] = uri
    return Bonsai(path, ET.parse(path).getroot(), prefixes)


def graph_of(workflow: ET.Element) -> Graph:
    nodes = list(workflow.find(f"{{{W}}}Nodes"))
    edges = [(int(edge.get("From")), int(edge.get("To")), edge.get("Label"))
             for edge in workflow.find(f"{{{W}}}Edges")]
    return Graph(nodes, edges)


def all_graphs(graph: Graph) -> list[Graph]:
    """The graph and every graph nested in its nodes (GroupWorkflow, Condition), depth first."""
    graphs = [graph]
    for node in graph.nodes:
        nested = node.find(f"{{{W}}}Workflow")
        if nested is not None:
            graphs += all_graphs(graph_of(nested))
    return graphs


def text(node: ET.Element, namespace: str, name: str) -> str:
    child = node.find(f"{{{namespace}}}{name}")
    assert child is not None, f"{name} missing"
    return child.text or ""


def combinator(node: ET.Element) -> ET.Element:
    return node.find(f"{{{W}}}Combinator")


@pytest.fixture(scope="module", params=WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def workflow(request) -> Bonsai:
    return load(request.param)


def named(name: str) -> Bonsai:
    return load(PLUGIN / name)


# ---------------------------------------------------------------------------------------------
# Bonsai's Parse and Format, in Python
# ---------------------------------------------------------------------------------------------
#
# Parse (Bonsai.Core ExpressionHelper.Parse): the pattern becomes a .NET regular expression in
# which every type token (%i, %d, ...) is the greedy group "(.*)" and every other character is
# copied verbatim ("%%" is a literal percent sign); the regex is searched for in the input
# (Regex.Match: unanchored, Singleline), a failed match throws "The input string failed to match
# the parse pattern", and each group is converted with the type's Parse method under
# CultureInfo.InvariantCulture: %i int.Parse (NumberStyles.Integer), %d double.Parse and %f
# float.Parse (NumberStyles.Float | AllowThousands), %s the text itself. Bonsai runs on .NET
# Framework 4.8, where NaN, Infinity and -Infinity are the invariant culture's spellings (exact
# match) and out-of-range numbers throw OverflowException. The result is built with
# Tuple.Create: ItemN is the N-th token's value, and more than eight tokens cannot be built.
# With a Separator (Regex.Unescape'd), the input is first split at it (empty entries removed) and
# every piece parsed with the pattern, giving an array. Only the tokens rtnf's workflows need are
# modelled.

_SPACE = "\t\n\v\f\r "  # .NET's leading/trailing white space in number parsing
_INT = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # AllowThousands
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ParseError(ValueError):
    """Where Bonsai's Parse node would throw (and the workflow would stop with an error)."""


def _dotnet_int(field: str) -> int:
    stripped = field.strip(_SPACE)
    if not _INT.fullmatch(stripped):
        raise ParseError(f"int.Parse({field!r}): input string was not in a correct format")
    value = int(stripped)
    if not -2**31 <= value < 2**31:
        raise ParseError(f"int.Parse({field!r}): overflow")
    return value


def _dotnet_double(field: str) -> float:
    stripped = field.strip(_SPACE)
    if stripped in _NON_FINITE:
        return _NON_FINITE[stripped]
    if not _REAL.fullmatch(stripped):
        raise ParseError(f"double.Parse({field!r}): input string was not in a correct format")
    value = float(stripped.replace(",", ""))
    if math.isinf(value):
        raise ParseError(f"double.Parse({field!r}): overflow")
    return value


def _dotnet_single(field: str) -> np.float32:
    value = _dotnet_double(field)
    with np.errstate(over="ignore"):
        single = np.float32(value)
    if math.isfinite(value) and math.isinf(single):
        raise ParseError(f"float.Parse({field!r}): overflow")
    return single


PARSERS = {"i": _dotnet_int, "d": _dotnet_double, "f": _dotnet_single, "s": str}


def bonsai_parse(pattern: str, line: str, separator: str = "") -> tuple | list:
    """What a Parse node with `pattern` (and `separator`) makes of `line` (see above);
    ParseError where Bonsai throws."""
    if separator:
        pieces = [piece for piece in line.split(separator) if piece]
        return [bonsai_parse(pattern, piece)[0] if len(pattern_tokens(pattern)) == 1
                else bonsai_parse(pattern, piece) for piece in pieces]
    regex, tokens, i = [], [], 0
    while i < len(pattern):
        if pattern[i] == "%":
            i += 1
            token = pattern[i]
            if token == "%":
                regex.append("%")
            elif token in PARSERS:
                tokens.append(token)
                regex.append("(.*)")
            else:
                raise ParseError(f"token %{token} is not modelled here")
        else:
            regex.append(pattern[i])
        i += 1
    if len(tokens) > 8:
        raise ParseError(f"{len(tokens)} tokens: Tuple.Create takes at most 8 values")
    match = re.search("".join(regex), line, re.DOTALL)
    if match is None:
        raise ParseError("The input string failed to match the parse pattern.")
    return tuple(PARSERS[token](group) for token, group in zip(tokens, match.groups()))


def pattern_tokens(pattern: str) -> list[str]:
    return re.findall(r"%([a-zA-Z])", pattern.replace("%%", ""))


# Format (Bonsai.Core FormatBuilder): string.Format(CultureInfo.InvariantCulture, Format, args),
# args being the Selector's members. Modelled: "{n}" and "{n:Fk}" items ("{{" and "}}" escapes
# too). On .NET Framework 4.8 a Single's ToString() is "G" with 7 significant digits, a Double's
# "G" with 15; "G" uses scientific notation ("1.5E-05", two exponent digits at least) when the
# exponent is below -5 or at least the precision, like Python's "g"; NaN and infinities are
# "NaN", "Infinity", "-Infinity"; negative zero prints as "0".


@dataclass(frozen=True)
class Net:
    """A .NET value: 'single' (System.Single) or 'double' (System.Double)."""

    kind: str
    value: float


def _dotnet_general(value: Net) -> str:
    x = float(np.float32(value.value)) if value.kind == "single" else value.value
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"
    return f"{x:.{7 if value.kind == 'single' else 15}g}".replace("e", "E")


def _dotnet_item(value: Net, spec: str) -> str:
    if spec == "":
        return _dotnet_general(value)
    fixed = re.fullmatch(r"F(\d+)", spec)
    assert fixed, f"format specifier {spec!r} is not modelled here"
    x = value.value
    if math.isnan(x) or math.isinf(x):
        return _dotnet_general(value)
    return f"{x:.{int(fixed.group(1))}f}"


def dotnet_format(fmt: str, args: list[Net]) -> str:
    out, i = [], 0
    while i < len(fmt):
        if fmt.startswith("{{", i) or fmt.startswith("}}", i):
            out.append(fmt[i])
            i += 2
        elif fmt[i] == "{":
            end = fmt.index("}", i)
            index, _, spec = fmt[i + 1:end].partition(":")
            out.append(_dotnet_item(args[int(index)], spec))
            i = end + 1
        else:
            out.append(fmt[i])
            i += 1
    return "".join(out)


def test_the_parse_model_follows_bonsai_semantics():
    assert bonsai_parse("%i,%d,%s,%s", "7,12.500000,stim-on,rule-1") == (7, 12.5, "stim-on",
                                                                           "rule-1")
    assert bonsai_parse("%d", " 1,234.5 ") == (1234.5,)  # AllowThousands, white space
    assert math.isnan(bonsai_parse("%i,%d", "1,NaN")[1])
    assert bonsai_parse("%f", "1E-05")[0] == np.float32(1e-5)
    assert bonsai_parse("x%%%i", "x%3") == (3,)
    assert bonsai_parse("%d", "1,2.5,,NaN", ",")[:2] == [1.0, 2.5]
    with pytest.raises(ParseError):  # nine tokens: no Tuple.Create overload
        bonsai_parse(",".join(["%d"] * 9), ",".join(["1"] * 9))
    for pattern, line in [("%i", "1.5"), ("%i,%d", "1"), ("%f", "1e39"), ("%d", "nan"),
                          ("%i", "3000000000")]:
        with pytest.raises(ParseError):
            bonsai_parse(pattern, line)
    # Greedy groups: one field too many ends up inside the integer group, which then fails.
    with pytest.raises(ParseError):
        bonsai_parse("%i,%d,%d", "1,2.0,3.0,4.0")


def test_the_format_model_follows_dotnet_invariant_culture():
    values = [Net("double", 5.5), Net("single", 1e-5), Net("single", 12345678.0),
              Net("single", math.nan), Net("double", -math.inf), Net("single", -0.0)]
    assert (dotnet_format("{0:F6},{1},{2},{3},{4},{5}", values)
            == "5.500000,1E-05,1.234568E+07,NaN,-Infinity,0")
    assert dotnet_format("{{{0}}}", [Net("double", 0.25)]) == "{0.25}"


# ---------------------------------------------------------------------------------------------
# Every workflow: XML, namespaces, node types, edges
# ---------------------------------------------------------------------------------------------


def test_the_plugin_ships_the_four_workflows_and_a_readme():
    assert [path.name for path in WORKFLOWS] == [
        "rtnf-behavior-lsl.bonsai", "rtnf-behavior-zmq.bonsai",
        "rtnf-closed-loop-gratings.bonsai", "rtnf-decoded.bonsai"]
    assert (PLUGIN / "README.md").is_file() and RULES_FILE.is_file()


def test_workflow_is_a_bonsai_workflow_builder(workflow):
    root = workflow.root
    assert qname(root.tag) == (W, "WorkflowBuilder")
    assert re.fullmatch(r"2\.\d+\.\d+", root.get("Version", ""))
    children = [qname(child.tag) for child in root]
    assert children in ([(W, "Description"), (W, "Workflow")], [(W, "Workflow")])


def test_workflow_declares_only_known_namespaces(workflow):
    assert set(workflow.prefixes.values()) <= NAMESPACES
    assert workflow.prefixes.get("") == W and workflow.prefixes.get("xsi") == XSI
    for element in workflow.root.iter():
        assert qname(element.tag)[0] in NAMESPACES
        for attribute in element.attrib:
            assert not attribute.startswith("{") or qname(attribute) == (XSI, "type") or \
                qname(attribute) == (XSI, "nil")


def _check_children(element: ET.Element, allowed: frozenset, where: str) -> None:
    for child in element:
        assert qname(child.tag) in allowed, f"{where}: unexpected element {child.tag}"


def test_workflow_uses_only_verified_nodes_and_properties(workflow):
    for graph in all_graphs(workflow.graph):
        for index, node in enumerate(graph.nodes):
            assert qname(node.tag) == (W, "Expression")
            kind = workflow.xsi_type(node)
            where = f"{workflow.path.name} node {index} ({kind})"
            assert kind in EXPRESSIONS, f"{where}: not in the allow-list"
            if EXPRESSIONS[kind] is not None:
                _check_children(node, EXPRESSIONS[kind], where)
            if kind == (W, "Combinator"):
                inner = combinator(node)
                inner_kind = workflow.xsi_type(inner)
                assert inner_kind in COMBINATORS, f"{where}: combinator {inner_kind} unknown"
                _check_children(inner, COMBINATORS[inner_kind], f"{where} {inner_kind}")
            elif kind == (W, "IncludeWorkflow"):
                path = node.get("Path")
                assert path in INCLUDES, f"{where}: include {path!r} unknown"
                _check_children(node, INCLUDES[path], f"{where} {path}")
            elif kind == (W, "Equal"):
                operand = node.find(f"{{{W}}}Operand")
                assert workflow.xsi_type(operand) in OPERANDS
                _check_children(operand, OPERANDS[workflow.xsi_type(operand)], where)
            elif kind == (W, "PropertyMapping"):
                for mapping in node.find(f"{{{W}}}PropertyMappings"):
                    assert qname(mapping.tag) == (W, "Property") and mapping.get("Name")


def test_workflow_edges_reference_existing_nodes_and_fill_each_input(workflow):
    for graph in all_graphs(workflow.graph):
        count = len(graph.nodes)
        for origin, to, label in graph.edges:
            assert 0 <= origin < count and 0 <= to < count and origin != to, (origin, to)
            assert re.fullmatch(r"Source[1-9]\d*", label), label
        for index in range(count):  # Bonsai numbers a node's inputs Source1..SourceN
            labels = sorted(int(label[6:]) for _, label in graph.predecessors(index))
            assert labels == list(range(1, len(labels) + 1)), (index, labels)
        remaining = {origin_to for origin_to in graph.edges}  # acyclic (Kahn)
        ready = [i for i in range(count) if not graph.predecessors(i)]
        while ready:
            node = ready.pop()
            for edge in [edge for edge in remaining if edge[0] == node]:
                remaining.discard(edge)
                if not any(other[1] == edge[1] for other in remaining):
                    ready.append(edge[1])
        assert not remaining, f"{workflow.path.name}: cycle through {remaining}"
        for index, node in enumerate(graph.nodes):
            if workflow.xsi_type(node) == (W, "WorkflowInput"):
                assert not graph.predecessors(index)


def test_nested_workflows_have_one_input_and_one_output(workflow):
    for graph in all_graphs(workflow.graph)[1:]:
        kinds = [workflow.xsi_type(node) for node in graph.nodes]
        assert kinds.count((W, "WorkflowInput")) == 1 and kinds.count((W, "WorkflowOutput")) == 1


def test_subjects_are_published_before_they_are_subscribed(workflow):
    published = {text(graph.nodes[i], W, "Name")
                 for graph, i in workflow.nodes_of_type((RX, "PublishSubject"))}
    subscribed = {text(graph.nodes[i], W, "Name")
                  for graph, i in workflow.nodes_of_type((W, "SubscribeSubject"))}
    assert subscribed <= published


# ---------------------------------------------------------------------------------------------
# Connection strings and topics against rtnf's configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    kind: str  # "Subscriber" or "Publisher"
    connection: str
    topic: str
    graph: Graph
    index: int


def endpoints(bonsai: Bonsai) -> list[Endpoint]:
    found = []
    for kind in ("Subscriber", "Publisher"):
        for graph, index in bonsai.nodes_of_type((ZMQ, kind)):
            inner = combinator(graph.nodes[index])
            found.append(Endpoint(kind, text(inner, ZMQ, "ConnectionString"),
                                  text(inner, ZMQ, "Topic"), graph, index))
    return found


def parse_chain(bonsai: Bonsai, endpoint: Endpoint) -> tuple[str, int]:
    """Subscriber -> MemberSelector Last -> zmq:ConvertToString -> Parse (RIGS.md): the pattern
    and the Parse node's index."""
    graph, index = endpoint.graph, endpoint.index
    steps = [((W, "MemberSelector"), None), ((W, "Combinator"), (ZMQ, "ConvertToString")),
             ((W, "Parse"), None)]
    for kind, inner in steps:
        (index, label), = graph.successors(index)
        assert label == "Source1" and bonsai.xsi_type(graph.nodes[index]) == kind
        if inner is not None:
            assert bonsai.combinator_type(graph.nodes[index]) == inner
        if kind == (W, "MemberSelector"):
            assert text(graph.nodes[index], W, "Selector") == "Last"  # the payload frame
    return text(graph.nodes[index], W, "Pattern"), index


def test_every_zmq_endpoint_matches_rtnfs_default_addresses_and_topics():
    config = load_config([RULES_FILE])
    found = {path.name: endpoints(load(path)) for path in WORKFLOWS}
    assert sum(len(items) for items in found.values()) == 3
    for name, items in found.items():
        for endpoint in items:
            if endpoint.kind == "Subscriber":  # rtnf binds outputs.zmq.address, Bonsai connects
                assert endpoint.connection == ">" + config.outputs.zmq.address, name
                matching = [t for t in RTNF_TOPICS if t.startswith(endpoint.topic)]
                assert endpoint.topic and matching == [endpoint.topic], name  # prefix filter
            else:  # Bonsai binds, rtnf connects to rig.sources.<kind>.address
                assert endpoint.connection == "@" + config.rig.sources.behavior.address, name
                assert endpoint.topic.encode() in TOPICS.values(), name


# ---------------------------------------------------------------------------------------------
# Real rtnf messages through the workflows' Parse patterns
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def layout(targets: tuple[str, ...]) -> OutputLayout:
    units = {"speed": "cm/s", "gaze_phi": "deg", "gaze_theta": "deg"}
    return OutputLayout(targets, tuple(units[t] for t in targets),
                        np.array([3, 17, 42], np.int64), 0.05, 0.05)


def output(sequence: int, decoded, commands=()) -> WindowOutput:
    return WindowOutput(sequence, 1234.5 + 0.05 * sequence, np.asarray(decoded, np.float32),
                        np.zeros(3, np.float32), tuple(commands))


def joined_subscriber(context: zmq.Context, sink: ZmqSink, targets: int) -> zmq.Socket:
    """A SUB socket past the slow-joiner gap (PUB drops what precedes the subscription)."""
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(sink.endpoint)
    deadline = time.monotonic() + WAIT_S
    while not subscriber.poll(10):
        assert time.monotonic() < deadline, "the subscriber never received a message"
        sink.publish(output(0, np.zeros(targets)))
    while subscriber.poll(50):
        subscriber.recv_multipart()
    return subscriber


def receive_all(subscriber: zmq.Socket, topic: bytes, count: int) -> list[bytes]:
    """The payloads of the next `count` messages on `topic` (others are skipped)."""
    payloads = []
    while len(payloads) < count:
        assert subscriber.poll(int(WAIT_S * 1000)), f"{len(payloads)} of {count} arrived"
        frames = subscriber.recv_multipart()
        assert len(frames) == 2  # [topic, payload]: what Subscriber -> Last relies on
        if frames[0] == topic:
            payloads.append(frames[1])
    return payloads


DECODED = [[12.5, -3.25, 7.0], [np.nan, 0.0, -0.0], [1e-5, 1.2345678e7, -45.0],
           [np.inf, -np.inf, 3.0], [0.1, 179.99, -180.0]]


def test_decoded_messages_from_a_real_sink_parse_into_typed_values(context):
    bonsai = named("rtnf-decoded.bonsai")
    (endpoint,) = endpoints(bonsai)
    pattern, parse_index = parse_chain(bonsai, endpoint)
    targets = tuple(load_config().decoding.targets)
    assert pattern_tokens(pattern) == ["i", "d"] + ["d"] * len(targets)
    sink = ZmqSink(layout(targets), ZmqOutputConfig(address="tcp://127.0.0.1:*"), context)
    try:
        subscriber = joined_subscriber(context, sink, len(targets))
        outputs = [output(10 + k, values) for k, values in enumerate(DECODED)]
        for item in outputs:
            sink.publish(item)
        payloads = receive_all(subscriber, endpoint.topic.encode(), len(outputs))
    finally:
        sink.close()
    assert not sink.errors
    for item, payload in zip(outputs, payloads, strict=True):
        values = bonsai_parse(pattern, payload.decode("utf-8"))  # ConvertToString: UTF-8
        assert [type(v) for v in values] == [int, float] + [float] * len(targets)
        assert values[0] == item.sequence and abs(values[1] - item.window_end) < 1e-6
        np.testing.assert_allclose(values[2:], item.decoded.astype(np.float64), rtol=1e-5)
    # What the workflow selects from the tuple: Item1..ItemN with N = the pattern's tokens.
    graph = endpoint.graph
    (subject, _), = graph.successors(parse_index)
    selected = [text(graph.nodes[i], W, "Selector") for i, _ in graph.successors(subject)]
    assert sorted(selected) == [f"Item{n}" for n in range(1, len(targets) + 3)]


def test_the_decoded_pattern_refuses_a_payload_with_another_target_count(context):
    """A bundle decoding two targets sends four fields: the three-target pattern throws."""
    pattern, _ = parse_chain(named("rtnf-decoded.bonsai"),
                             endpoints(named("rtnf-decoded.bonsai"))[0])
    sink = ZmqSink(layout(("speed", "gaze_phi")), ZmqOutputConfig(address="tcp://127.0.0.1:*"),
                   context)
    try:
        subscriber = joined_subscriber(context, sink, 2)
        sink.publish(output(3, [4.0, 5.0]))
        (payload,) = receive_all(subscriber, b"decoded", 1)
    finally:
        sink.close()
    with pytest.raises(ParseError):
        bonsai_parse(pattern, payload.decode())


# The Parse settings README.md documents for each topic: (pattern, separator).
DOCUMENTED = {"decoded": ("%i,%d,%d,%d,%d", ""), "control": ("%i,%d,%s,%s", ""),
              "predicted": ("%d", ","), "telemetry": ("%d", ",")}


def test_the_readme_parse_settings_read_every_topic_of_a_real_sink(context):
    readme = (PLUGIN / "README.md").read_text()
    for topic, (pattern, separator) in DOCUMENTED.items():
        documented = f"Pattern `{pattern}`" + (f", Separator `{separator}`" if separator else "")
        assert f"| `{topic}` |" in readme and documented in readme, topic
    the_layout = layout(("speed", "gaze_phi", "gaze_theta"))
    sink = ZmqSink(the_layout, ZmqOutputConfig(address="tcp://127.0.0.1:*"), context)
    counters = {"windows": 9, "skipped": 1, "late_spikes": 0, "rejected": 2, "reconnects": 0,
                "engine_errors": 4, "engine_skipped": 3}
    sample = TelemetrySample(7, 1234.85, {"ingest": 0.1, "infer": 3.5}, 4.25, counters)
    try:
        subscriber = joined_subscriber(context, sink, 3)
        item = WindowOutput(7, 1234.85, np.array([1.5, 2.0, -3.0], np.float32),
                            np.array([0.5, 1e-4, 2.0], np.float32), ())
        sink.publish(item)
        sink.publish_telemetry(sample)
        received = {}
        while len(received) < 3:
            assert subscriber.poll(int(WAIT_S * 1000))
            topic, payload = subscriber.recv_multipart()
            received[topic.decode()] = payload.decode("utf-8")
    finally:
        sink.close()
    decoded = bonsai_parse(DOCUMENTED["decoded"][0], received["decoded"])
    assert decoded[0] == 7 and decoded[2:] == (1.5, 2.0, -3.0)
    predicted = bonsai_parse(DOCUMENTED["predicted"][0], received["predicted"], ",")
    assert predicted[0] == 7 and predicted[1] == pytest.approx(1234.85)
    np.testing.assert_allclose(predicted[2:], item.predicted, rtol=1e-5)
    telemetry = bonsai_parse(DOCUMENTED["telemetry"][0], received["telemetry"], ",")
    assert len(telemetry) == 3 + len(STAGES) + len(counters)
    assert telemetry[2] == 4.25 and telemetry[2 + 1 + STAGES.index("infer")] == 3.5
    assert math.isnan(telemetry[2 + 1 + STAGES.index("close")])  # not measured: NaN
    assert telemetry[-len(counters):] == [9.0, 1.0, 0.0, 2.0, 0.0, 4.0, 3.0]
    with pytest.raises(ParseError):  # the long line has more fields than a tuple can hold
        bonsai_parse(",".join(["%i", "%d"] + ["%d"] * 6 + ["%i"] * len(counters)),
                     received["telemetry"])


def contrast_for_commands(bonsai: Bonsai, parse_graph: Graph, parse_index: int) -> dict:
    """command -> the grating contrast the closed-loop workflow sets for it: Parse ->
    MemberSelector Item3 -> rx:Condition (Equal StringProperty) -> FloatProperty -> Merge ->
    PropertyMapping Contrast -> DrawGratings."""
    graph = parse_graph
    (selector, _), = graph.successors(parse_index)
    assert text(graph.nodes[selector], W, "Selector") == "Item3"  # the command field
    contrasts = {}
    for condition, _ in graph.successors(selector):
        node = graph.nodes[condition]
        assert bonsai.xsi_type(node) == (RX, "Condition")
        inner = graph_of(node.find(f"{{{W}}}Workflow"))
        (equal,) = [n for n in inner.nodes if bonsai.xsi_type(n) == (W, "Equal")]
        command = text(equal.find(f"{{{W}}}Operand"), W, "Value")
        (value_node, _), = graph.successors(condition)
        assert bonsai.combinator_type(graph.nodes[value_node]) == (W, "FloatProperty")
        contrast = float(text(combinator(graph.nodes[value_node]), W, "Value"))
        (merge, _), = graph.successors(value_node)
        (mapping, _), = graph.successors(merge)
        assert bonsai.xsi_type(graph.nodes[mapping]) == (W, "PropertyMapping")
        (mapped,) = graph.nodes[mapping].find(f"{{{W}}}PropertyMappings")
        (target, label), = graph.successors(mapping)
        assert graph.nodes[target].get("Path") == DRAW_GRATINGS and label == "Source2"
        assert (W, mapped.get("Name")) in INCLUDES[DRAW_GRATINGS]
        contrasts[command] = (mapped.get("Name"), contrast)
    return contrasts


def test_control_commands_from_the_shipped_rule_switch_the_grating(context):
    bonsai = named("rtnf-closed-loop-gratings.bonsai")
    (endpoint,) = endpoints(bonsai)
    pattern, parse_index = parse_chain(bonsai, endpoint)
    assert pattern_tokens(pattern) == ["i", "d", "s", "s"]
    contrasts = contrast_for_commands(bonsai, endpoint.graph, parse_index)
    assert contrasts == {"running": ("Contrast", 1.0), "resting": ("Contrast", 0.0)}
    (draw,) = [i for i, node in enumerate(endpoint.graph.nodes)
               if node.get("Path") == DRAW_GRATINGS]
    assert float(text(endpoint.graph.nodes[draw], W, "Contrast")) == 0.0  # blank until told

    config = load_config([RULES_FILE])  # the rule rtnf runs with this workflow
    targets = tuple(config.decoding.targets)
    rules = Rules.from_config(config.control.rules, layout(targets))
    speeds = [0.0] * 6 + [10.0] * 10 + [1.0] * 6  # rest, run (> 5 cm/s for 0.5 s), rest
    sink = ZmqSink(layout(targets), ZmqOutputConfig(address="tcp://127.0.0.1:*"), context)
    try:
        subscriber = joined_subscriber(context, sink, len(targets))
        fired = []
        for k, speed in enumerate(speeds, start=100):
            item = output(k, [speed, 0.0, 0.0])
            commands = rules.evaluate(k, item.window_end, item.decoded, item.predicted)
            fired += [(k, command) for command in commands]
            sink.publish(output(k, item.decoded, commands))
        payloads = receive_all(subscriber, endpoint.topic.encode(), len(fired))
    finally:
        sink.close()
    assert [command.name for _, command in fired] == ["running", "resting"]
    assert not sink.errors
    stimulus = []
    for (sequence, command), payload in zip(fired, payloads, strict=True):
        seq, window_end, name, rule = bonsai_parse(pattern, payload.decode("utf-8"))
        assert (seq, name, rule) == (sequence, command.name, command.rule)
        assert abs(window_end - output(sequence, [0, 0, 0]).window_end) < 1e-6
        stimulus.append(contrasts[name][1])
    assert stimulus == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Behaviour from Bonsai into rtnf's real sources
# ---------------------------------------------------------------------------------------------

# Samples as the Behaviour group produces them (three System.Single values) with their LSL
# timestamps (System.Double), in order: speed cm/s, gaze_phi deg, gaze_theta deg.
SAMPLES = [(100.000001, 12.5, -3.25, 7.0), (100.05, 1e-5, 12345678.0, math.nan),
           (100.1, -0.0, 179.99, -180.0), (100.15, 0.333333333, 2.5e-7, 42.0)]


def format_lines(bonsai: Bonsai) -> list[str]:
    """The text the workflow's Format node makes of SAMPLES (Timestamped<Tuple<float x3>>)."""
    (graph, index), = bonsai.nodes_of_type((W, "Format"))
    node = graph.nodes[index]
    (previous, _), = graph.predecessors(index)
    assert bonsai.combinator_type(graph.nodes[previous]) == (LSL, "Timestamp")  # LSL clock
    members = {"Timestamp": 0, "Value.Item1": 1, "Value.Item2": 2, "Value.Item3": 3}
    selector = [member.strip() for member in text(node, W, "Selector").split(",")]
    assert set(selector) == set(members)
    lines = []
    for sample in SAMPLES:
        values = [Net("double" if members[m] == 0 else "single", sample[members[m]])
                  for m in selector]
        lines.append(dotnet_format(text(node, W, "Format"), values))
    return lines


def collect(source, count: int) -> list[Batch]:
    batches, deadline = [], time.monotonic() + WAIT_S
    while sum(len(b.timestamps) for b in batches) < count:
        assert time.monotonic() < deadline, "the source did not deliver"
        batches += source.poll(0.02)
    return batches


def assert_behaviour(batches: list[Batch], stamps: list[float] | None = None) -> None:
    assert all(batch.kind == "behavior" for batch in batches)
    records = np.concatenate([batch.records for batch in batches])
    expected = np.array([sample[1:] for sample in SAMPLES], np.float32)
    np.testing.assert_allclose(records, expected, rtol=1e-6, atol=0)  # NaN matches NaN
    if stamps is not None:
        timestamps = np.concatenate([batch.timestamps for batch in batches])
        np.testing.assert_allclose(timestamps, stamps, atol=1e-6, rtol=0)


def test_behaviour_lines_from_the_format_node_are_accepted_by_rtnfs_zmq_source(context):
    bonsai = named("rtnf-behavior-zmq.bonsai")
    (endpoint,) = endpoints(bonsai)
    assert endpoint.kind == "Publisher" and endpoint.connection.startswith("@")
    (format_index, _), = endpoint.graph.predecessors(endpoint.index)
    assert bonsai.xsi_type(endpoint.graph.nodes[format_index]) == (W, "Format")
    lines = format_lines(bonsai)
    assert lines[1] == "100.050000,1E-05,1.234568E+07,NaN"
    publisher = context.socket(zmq.PUB)  # binds, as the workflow's "@" does
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.bind("tcp://127.0.0.1:*")
    source = ZmqSource(publisher.getsockopt_string(zmq.LAST_ENDPOINT), ["behavior"],
                       context=context)
    topic = endpoint.topic.encode()  # Publisher sends the topic frame first, then the string
    try:
        deadline = time.monotonic() + WAIT_S
        while not source.poll(0.02):  # slow joiner: a probe stamped before the samples
            assert time.monotonic() < deadline, "the source never joined"
            publisher.send_multipart([topic, b"99.000000,0,0,0"])
        while source.poll(0.05):
            pass
        for line in lines:
            publisher.send_multipart([topic, line.encode("utf-8")])
        batches = collect(source, len(SAMPLES))
    finally:
        source.close()
    assert not source.rejected
    assert_behaviour(batches, [sample[0] for sample in SAMPLES])


def test_the_lsl_variant_stream_is_resolved_and_read_by_rtnfs_lsl_source():
    bonsai = named("rtnf-behavior-lsl.bonsai")
    (graph, index), = bonsai.nodes_of_type((LSL, "StreamOutlet"))
    node = graph.nodes[index]
    name, content_type = text(node, LSL, "Name"), text(node, LSL, "ContentType")
    channels = int(text(node, LSL, "ChannelCount"))
    selector = text(node, LSL, "Selector").split(",")
    assert channels == len(selector) == 3  # StreamOutlet: one selected member per channel
    (group, _), = graph.predecessors(index)
    inner = graph_of(graph.nodes[group].find(f"{{{W}}}Workflow"))
    floats = [n for n in inner.nodes if bonsai.combinator_type(n) == (W, "FloatProperty")]
    assert len(floats) == channels  # float members -> a cf_float32 stream (StreamOutlet.cs)

    pylsl = import_pylsl("loopback")
    source_id = f"rtnf-test-bonsai-{uuid.uuid4().hex[:8]}"  # keeps concurrent runs apart
    info = pylsl.StreamInfo(name, content_type, channels, float(text(node, LSL, "SampleRate")),
                            pylsl.cf_float32, source_id)  # no channel labels, as StreamOutlet
    outlet = pylsl.StreamOutlet(info)
    config = SourceConfig(kind="lsl", lsl=LslSourceConfig(name=name, type=content_type,
                                                          source_id=source_id))
    source = LslSource("behavior", config, pylsl)
    try:
        assert outlet.wait_for_consumers(WAIT_S)
        for sample in SAMPLES:
            outlet.push_sample(list(sample[1:]))  # stamped by liblsl at push, as Bonsai's
        batches = collect(source, len(SAMPLES))
    finally:
        source.close()
    assert not source.rejected
    assert_behaviour(batches)
