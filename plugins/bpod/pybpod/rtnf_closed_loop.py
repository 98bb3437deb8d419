"""rtnf closed loop on Bpod, run by pybpod-api: rtnf's UDP commands drive the state machine.

rtnf (`rtnf run --config plugins/bpod/rtnf-bpod.yaml`) sends the datagram `SoftCode<k>` to this
process's UDP port whenever a control rule fires: k = 1 for `running` (decoded running speed
above the rule's threshold), k = 2 for `resting` (the same rule letting go). Each trial:

    WaitForRunning --SoftCode1--> Reward --Tup--> Running --SoftCode2--> Resting --Tup--> exit
          |  Tup (wait_s: no bout)                   |  Tup (max_running_s: bout capped)
          +--> exit                                  +--> Resting
    (Reward also leaves for Resting on SoftCode2: a bout shorter than the valve time)

Run it on the PC wired to the state machine (python rtnf_closed_loop.py --help for settings):

    python plugins/bpod/pybpod/rtnf_closed_loop.py --serial-port /dev/ttyACM0 --net-port 36000

How a datagram becomes a state change (verified in pybpod/pybpod-api, pybpodapi/bpod/
bpod_base.py and non_blockingsocketreceive.py; sanworks/Bpod_StateMachine_Firmware,
Preconfigured/v23/StateMachine-Bpod2_5/StateMachine-Bpod2_5.ino):

1. `Bpod(net_port=N)` binds a UDP socket on N; a thread receives each datagram (recv(64)) into a
   queue. Only `run_state_machine`'s loop reads that queue, so commands that arrive between
   trials wait there (`drain_stale_commands` drops them before each trial; see below).
2. `handle_inline` strips the text; `SoftCode<k>` becomes `trigger_softcode(int(text[-1]) - 1)`:
   only the last character is read, hence k = 1..9, and pybpod sends soft code k - 1.
3. pybpod writes op code '~' and the byte k - 1; the firmware turns soft code byte b into the
   USB channel's event number b (counted from that channel's first event), and pybpod names that
   channel's events 'SoftCode1', 'SoftCode2', ... (pybpodapi/bpod/hardware/channels.py,
   `'SoftCode' + str(j + 1)`). So rtnf's `SoftCode<k>` arrives as the event 'SoftCode<k>': the
   datagram's text is the name of the event it causes (`softcode_event`).
4. The firmware ignores soft codes while no trial runs; pybpod only applies them while one does.

pybpod-api refuses firmware newer than its TARGET_BPOD_FIRMWARE_VERSION (22 in
pybpodapi/settings.py), so this protocol runs on firmware 22; the App serial port path
(plugins/bpod/matlab) needs firmware 23 and MATLAB.

The state description (`trial_states`) is plain data, so it can be read and tested without
pybpod or a state machine; `build_state_machine` turns it into pybpod's StateMachine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:  # running the protocol needs pybpod-api; describing it does not
    from pybpodapi.protocol import Bpod, StateMachine
except ImportError:  # pragma: no cover - depends on the rig PC
    Bpod = StateMachine = None

NET_SOFT_CODES = range(1, 10)  # SoftCode<k>: one digit, and k = 0 would ask for soft code -1


@dataclass(frozen=True)
class Settings:
    """The protocol's settings; the soft codes must match rtnf-bpod.yaml's rule."""

    net_port: int = 36000  # outputs.bpod.net_port in rtnf-bpod.yaml
    serial_port: str | None = None  # the state machine's USB serial port; None: pybpod's setting
    running_code: int = 1  # control.rules[running].soft_code
    resting_code: int = 2  # control.rules[running].release_soft_code
    wait_s: float = 60.0  # a trial with no running bout ends after this long
    reward_valve_s: float = 0.05  # valve 1 open time at the start of a bout (calibrate it)
    max_running_s: float = 10.0  # stimulus (BNC1, port 1 LED) for at most this long per bout
    rest_s: float = 1.0  # after a bout, time before the trial ends (the next one starts)
    trials: int = 1000
    data: Path = field(default_factory=lambda: Path("rtnf_closed_loop_trials.jsonl"))


@dataclass(frozen=True)
class State:
    """One state: what pybpod's `StateMachine.add_state` takes, as plain data."""

    name: str
    timer: float  # seconds until the state's Tup event
    transitions: dict[str, str]  # event name -> next state ('exit' ends the trial)
    outputs: tuple[tuple[str, int], ...] = ()  # (output channel, value) while in the state


def softcode_event(code: int) -> str:
    """The state machine event that rtnf's datagram `SoftCode<code>` causes (module docstring,
    step 3): 'SoftCode<code>'."""
    if code not in NET_SOFT_CODES:
        raise ValueError(f"soft code {code}: rtnf's bpod_udp sink sends SoftCode1..SoftCode9")
    return f"SoftCode{code}"


def trial_states(settings: Settings) -> list[State]:
    """One trial: wait for `running`, reward it, keep the stimulus on until `resting`."""
    if settings.running_code == settings.resting_code:
        raise ValueError("running_code and resting_code must differ")
    running, resting = softcode_event(settings.running_code), softcode_event(settings.resting_code)
    return [
        # No output: the animal is expected to be still. rtnf's `running` starts the bout; with
        # none for wait_s the trial ends (data saved, a new trial starts waiting again).
        State("WaitForRunning", settings.wait_s, {running: "Reward", "Tup": "exit"}),
        # Valve 1 opens for reward_valve_s as the bout starts (stimulus already on). A bout that
        # ends before the valve closes goes straight to Resting.
        State("Reward", settings.reward_valve_s, {"Tup": "Running", resting: "Resting"},
              (("Valve1", 1), ("BNC1", 1), ("PWM1", 255))),
        # Stimulus on (BNC1 high for a stimulus PC or laser driver, port 1 LED on) while rtnf
        # decodes running; `resting` ends it, so does max_running_s.
        State("Running", settings.max_running_s, {resting: "Resting", "Tup": "Resting"},
              (("BNC1", 1), ("PWM1", 255))),
        # Outputs off; the trial ends after rest_s.
        State("Resting", settings.rest_s, {"Tup": "exit"}),
    ]


def build_state_machine(bpod: Any, settings: Settings) -> Any:
    """pybpod's StateMachine for one trial, from `trial_states`."""
    sma = StateMachine(bpod)
    for state in trial_states(settings):
        sma.add_state(state_name=state.name, state_timer=state.timer,
                      state_change_conditions=dict(state.transitions),
                      output_actions=list(state.outputs))
    return sma


def drain_stale_commands(bpod: Any) -> int:
    """Drop the UDP commands queued while no trial ran (pybpod would apply them at the start of
    the next trial, late); returns how many. `bpod.socketin` is pybpod's NonBlockingSocketReceive
    (None without a net_port); its readline() returns None when the queue is empty."""
    receiver = getattr(bpod, "socketin", None)
    dropped = 0
    while receiver is not None and receiver.readline() is not None:
        dropped += 1
    return dropped


def run(settings: Settings) -> None:
    """The trial loop: one state machine per trial; each trial's data appended as one JSON line
    to settings.data (pybpod also keeps its own session record)."""
    if Bpod is None:
        sys.exit("pybpod-api is not installed here: pip install pybpod-api (on the rig PC)")
    options: dict[str, Any] = {"net_port": settings.net_port}
    if settings.serial_port:
        options["serial_port"] = settings.serial_port
    bpod = Bpod(**options)
    print(f"listening for rtnf on UDP port {settings.net_port}: SoftCode{settings.running_code} "
          f"= running, SoftCode{settings.resting_code} = resting", flush=True)
    settings.data.parent.mkdir(parents=True, exist_ok=True)
    try:
        with settings.data.open("a") as record:
            for trial in range(1, settings.trials + 1):
                sma = build_state_machine(bpod, settings)
                bpod.send_state_machine(sma)
                stale = drain_stale_commands(bpod)
                bpod.run_state_machine(sma)
                data = bpod.session.current_trial.export()
                line = {"trial": trial, "wall_time": time.time(), "stale_commands": stale,
                        "settings": {k: str(v) for k, v in asdict(settings).items()}, **data}
                record.write(json.dumps(line, default=str) + "\n")
                record.flush()
                states = data.get("States timestamps", {})
                bout = "bout" if "Reward" in states else "no bout"
                print(f"trial {trial}: {bout}", flush=True)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        bpod.close()


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net-port", type=int, default=defaults.net_port,
                        help="UDP port rtnf sends to (outputs.bpod.net_port)")
    parser.add_argument("--serial-port", default=None,
                        help="the state machine's serial port (default: pybpod's settings)")
    parser.add_argument("--running-code", type=int, default=defaults.running_code)
    parser.add_argument("--resting-code", type=int, default=defaults.resting_code)
    parser.add_argument("--wait-s", type=float, default=defaults.wait_s)
    parser.add_argument("--reward-valve-s", type=float, default=defaults.reward_valve_s)
    parser.add_argument("--max-running-s", type=float, default=defaults.max_running_s)
    parser.add_argument("--rest-s", type=float, default=defaults.rest_s)
    parser.add_argument("--trials", type=int, default=defaults.trials)
    parser.add_argument("--data", type=Path, default=defaults.data,
                        help="JSON-lines file each trial's data is appended to")
    args = parser.parse_args(argv)
    settings = Settings(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    trial_states(settings)  # refuses codes rtnf cannot send
    return settings


if __name__ == "__main__":
    run(parse_settings())
