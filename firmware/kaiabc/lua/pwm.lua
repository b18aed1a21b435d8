-- The ELM11's `pwm` module, stubbed for the desktop: remembers setup and duty per pin
-- and prints each change as "pwm <pin> <duty>" (the tests read it).
local pwm = {pins = {}}

function pwm.setup(pin, freq, duty)
    pwm.pins[pin] = {freq = freq, duty = duty, running = false}
end

function pwm.start(pin)
    pwm.pins[pin].running = true
end

function pwm.setduty(pin, duty)
    assert(duty >= 0 and duty <= 1023, "duty out of range: " .. tostring(duty))
    pwm.pins[pin].duty = duty
    print("pwm " .. pin .. " " .. duty)
end

return pwm
