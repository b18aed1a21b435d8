"""MQTT: the device-facing edge, the delivery policy, the gateway's client, the managed mosquitto.

``service`` assembles them (see its docstring for the start order); docs/mqtt.md says what an
acknowledgement guarantees.
"""
