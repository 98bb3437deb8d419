# rtnf closed loop, pyControl side: a stimulus (the pyboard's LED standing in for it) while
# rtnf decodes that the animal runs. rtnf's rule fires the command `running` when decoded speed
# crosses a threshold and `still` when it falls back; the GUI's rtnf_api class (api_classes/
# rtnf_api.py) turns them into the events rtnf_running / rtnf_still and keeps v.rtnf_speed
# at the latest decoded speed (cm/s, rate-limited).
#
# A pyControl task definition (MicroPython, runs on the pyboard): copy it to the pyControl
# folder's tasks/ and select it in the GUI. See plugins/pycontrol/README.md.
#
# Not linted as desktop Python: pyControl task files star-import the framework (`v`,
# `goto_state`, `second`, ...) and run on MicroPython, hence .format() rather than f-strings.
# ruff: noqa

from pyControl.utility import *
from devices import *
from pyb import LED

# Hardware (normally in a hardware definition file): the pyboard's green LED as the stimulus.
stimulus_LED = LED(2)

# States and events. Events the API triggers must be listed here.
states = ["waiting", "stimulus"]
events = ["rtnf_running", "rtnf_still"]
initial_state = "waiting"

# Variables.
v.api_class = "rtnf_api"  # the GUI loads api_classes/rtnf_api.py, class rtnf_api
v.rtnf_speed = 0.0  # set by the API from rtnf's decoded speed (cm/s)
v.max_stimulus_duration = 2 * second
v.n_stimuli = 0


# State behaviour.
def waiting(event):
    if event == "rtnf_running":
        goto_state("stimulus")


def stimulus(event):
    if event == "entry":
        v.n_stimuli += 1
        stimulus_LED.on()
        timed_goto_state("waiting", v.max_stimulus_duration)
        print("stimulus {} at decoded speed {}".format(v.n_stimuli, v.rtnf_speed))
    elif event == "exit":
        stimulus_LED.off()
    elif event == "rtnf_still":
        goto_state("waiting")


def run_end():  # Turn off hardware at the end of the run.
    stimulus_LED.off()
