"""MicroPython's `machine` on CPython: the Pin, I2C and PWM the spec's Pico client touches.
PWM remembers what the client set (`PWM.instances[i].duty`), for the tests."""


class Pin:
    OUT, IN = 1, 0

    def __init__(self, pin_id, mode=-1, *args, **kwargs):
        self.id = pin_id


class I2C:
    def __init__(self, bus_id, *args, **kwargs):
        self.id = bus_id


class PWM:
    instances = []

    def __init__(self, pin):
        self.pin, self.frequency, self.duty = pin, None, None
        PWM.instances.append(self)

    def freq(self, value=None):
        if value is None:
            return self.frequency
        self.frequency = value

    def duty_u16(self, value=None):
        if value is None:
            return self.duty
        if not 0 <= value <= 65535:
            raise ValueError("duty_u16 out of range: %r" % value)
        self.duty = value
