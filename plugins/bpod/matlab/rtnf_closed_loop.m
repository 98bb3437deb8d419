function rtnf_closed_loop
% rtnf_closed_loop: a Bpod (MATLAB, Bpod_Gen2) protocol driven by rtnf's soft codes on the
% state machine's App serial port.
%
% rtnf decodes behaviour from spikes every 50 ms. Its control rule `running`
% (plugins/bpod/rtnf-bpod.yaml) writes one byte to the App port when the decoded running
% speed rises above a threshold (soft code 1) and another when it falls back (soft code 2,
% the rule's release). The state machine turns App-port byte n into the event APP_SoftCode<n>
% (0-indexed: byte 1 -> APP_SoftCode1), which this protocol uses in StateChangeConditions:
%
%   WaitForRunning --APP_SoftCode1--> Reward --Tup--> Running --APP_SoftCode2--> Resting --Tup--> exit
%        |  Tup (WaitTimeout: no bout)                   |  Tup (MaxRunning: bout capped)
%        +--> exit                                       +--> Resting
%   (Reward also leaves for Resting on APP_SoftCode2: a bout shorter than the valve time)
%
% REQUIREMENTS
% - State machine r2 or newer (r2.0-2.5, 2+) with firmware v23 or newer: only these expose the
%   second USB serial port, the App port (BpodSystem.HW.AppSerialPortName).
% - Bpod_Gen2 with App-port support (events named APP_SoftCode0, APP_SoftCode1, ...).
% - Copy this file to Bpod_Local/Protocols/rtnf_closed_loop/rtnf_closed_loop.m and launch it
%   from the Bpod console as any protocol.
% - rtnf on the same PC (the App port shares the state machine's USB cable), started with
%       rtnf run --bundle BUNDLE --config plugins/bpod/rtnf-bpod.yaml ...
%           --set outputs.bpod.serial_port=<the App port printed by this protocol>
%   rtnf opens the port with DTR asserted (the state machine reads the App port only then) and
%   reopens it by itself if the cable is unplugged and plugged back.
%
% HOW THE BYTES BECOME EVENTS (verified against the Sanworks sources)
% - sanworks/Bpod_Gen2, Examples/State Machines/USB Soft Codes/SoftCodeTriggeredStateChange_APP.m:
%   a byte written to BpodSystem.HW.AppSerialPortName is the event APP_SoftCode<byte>, codes are
%   0-indexed in range 0-14; FSM 2 or newer with firmware v23.
% - sanworks/Bpod_StateMachine_Firmware, Preconfigured/v23/StateMachine-Bpod2_5: the App port
%   (SerialUSB1, input channel 'Z') is read once per 100 us cycle, only while a trial runs; a
%   byte arriving between trials is discarded, and a byte >= the channel's event count (15) is
%   ignored. Keep rtnf's codes in 1..14 and keep the gap between trials short.
% - Bpod_Gen2's SetupStateMachine names the App channel's events ['APP_SoftCode' num2str(j-1)].
%
% DATA: BpodSystem.Data (AddTrialEvents) is saved after every trial (SaveBpodSessionData);
% BpodSystem.Data.Bout(trial) is 1 when rtnf's `running` started a bout in that trial, and
% BpodSystem.Data.BoutDuration(trial) its length in seconds (NaN without a bout).

global BpodSystem

%% Checks: the App port exists (state machine r2+, firmware 23+)
if BpodSystem.FirmwareVersion < 23 || isempty(BpodSystem.HW.AppSerialPortName)
    error(['rtnf_closed_loop needs the App serial port: state machine r2 or newer with ' ...
           'firmware v23 or newer (this one: firmware v%d).'], BpodSystem.FirmwareVersion);
end
disp(['rtnf: start rtnf with --set outputs.bpod.serial_port=' BpodSystem.HW.AppSerialPortName]);

%% Settings (editable in the parameter GUI; the codes must match rtnf-bpod.yaml)
S = BpodSystem.ProtocolSettings;
if isempty(fieldnames(S))
    S.GUI.RunningCode = 1;    % control.rules[running].soft_code -> APP_SoftCode1
    S.GUI.RestingCode = 2;    % control.rules[running].release_soft_code -> APP_SoftCode2
    S.GUI.WaitTimeout = 60;   % s: a trial with no running bout ends after this long
    S.GUI.RewardAmount = 2;   % ul from valve 1 at the start of each bout
    S.GUI.MaxRunning = 10;    % s: stimulus on for at most this long per bout
    S.GUI.RestTime = 1;       % s: after a bout, before the trial ends
end
BpodParameterGUI('init', S);

%% Trial loop: one trial = wait for a bout, reward it, stimulus until rtnf says resting
maxTrials = 10000;
BpodSystem.Data.Bout = [];
BpodSystem.Data.BoutDuration = [];
for currentTrial = 1:maxTrials
    S = BpodParameterGUI('sync', S);
    if S.GUI.RunningCode == S.GUI.RestingCode
        error('RunningCode and RestingCode must differ');
    end
    runningEvent = ['APP_SoftCode' num2str(S.GUI.RunningCode)];
    restingEvent = ['APP_SoftCode' num2str(S.GUI.RestingCode)];
    valveTime = GetValveTimes(S.GUI.RewardAmount, 1); % from the liquid calibration of valve 1

    sma = NewStateMachine();
    % Waiting: no output. rtnf's `running` (byte RunningCode) starts a bout; without one
    % for WaitTimeout seconds the trial ends and a new one starts waiting.
    sma = AddState(sma, 'Name', 'WaitForRunning', ...
        'Timer', S.GUI.WaitTimeout, ...
        'StateChangeConditions', {runningEvent, 'Reward', 'Tup', 'exit'}, ...
        'OutputActions', {});
    % Reward: valve 1 open for valveTime, stimulus already on. A bout that ends before the
    % valve closes (rtnf's `resting`) goes straight to Resting.
    sma = AddState(sma, 'Name', 'Reward', ...
        'Timer', valveTime, ...
        'StateChangeConditions', {'Tup', 'Running', restingEvent, 'Resting'}, ...
        'OutputActions', {'Valve1', 1, 'BNC1', 1, 'PWM1', 255});
    % Running: stimulus on (BNC1 high for a stimulus PC or laser driver, port 1 LED) while
    % rtnf decodes running; `resting` (byte RestingCode) ends it, so does MaxRunning.
    sma = AddState(sma, 'Name', 'Running', ...
        'Timer', S.GUI.MaxRunning, ...
        'StateChangeConditions', {restingEvent, 'Resting', 'Tup', 'Resting'}, ...
        'OutputActions', {'BNC1', 1, 'PWM1', 255});
    % Resting: outputs off; the trial ends after RestTime.
    sma = AddState(sma, 'Name', 'Resting', ...
        'Timer', S.GUI.RestTime, ...
        'StateChangeConditions', {'Tup', 'exit'}, ...
        'OutputActions', {});

    SendStateMachine(sma);
    RawEvents = RunStateMachine; % App-port bytes count only while this runs

    if ~isempty(fieldnames(RawEvents)) % empty if the session was stopped mid-trial
        BpodSystem.Data = AddTrialEvents(BpodSystem.Data, RawEvents);
        BpodSystem.Data.TrialSettings(currentTrial) = S;
        states = BpodSystem.Data.RawEvents.Trial{currentTrial}.States;
        bout = ~isnan(states.Reward(1));
        BpodSystem.Data.Bout(currentTrial) = bout;
        if bout
            lastStimulus = max([states.Reward(end) states.Running(end)]);
            BpodSystem.Data.BoutDuration(currentTrial) = lastStimulus - states.Reward(1);
        else
            BpodSystem.Data.BoutDuration(currentTrial) = NaN;
        end
        SaveBpodSessionData;
    end
    HandlePauseCondition; % the console's pause button
    if BpodSystem.Status.BeingUsed == 0 % the console's stop button
        return
    end
end
