"""The milter layer: the one place that speaks the milter protocol to the MTA.

It negotiates what the active brains need, turns the MTA's commands into
calls on an engine session, and applies the recorded edits at end of message.
"""
