"""Eclipse hawkBit's DDI device protocol, as an adapter over our own services.

Devices that run SWUpdate (suricatta), rauc-hawkbit-updater or Zephyr's hawkBit client reach
``/{tenant}/controller/v1/{controllerId}`` and take part in rollouts like native devices: a DDI
action is an UpdateSession (its sequential id is the numeric action id), DDI feedback moves the
session through rollouts.services, and the poll asks rollouts.poll what to offer. docs/ddi.md
describes it for operators.
"""
