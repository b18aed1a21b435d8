import urequests
import ujson
from machine import Pin, I2C, PWM
import time

API_BASE = "http://192.168.1.100:8000/v1"
API_KEY = "kaiabc_node_pico_001"
NODE_ID = "pico_001"

# PWM setup for output control
pwm_pin = PWM(Pin(15))
pwm_pin.freq(1000)

def send_sensor_data(temp_k, humidity, pressure):
    headers = {
        "X-API-Key": API_KEY,
        "Content-Type": "application/json"
    }
    payload = {
        "node_id": NODE_ID,
        "timestamp": get_iso_timestamp(),
        "temperature_kelvin": temp_k,
        "humidity_percent": humidity,
        "pressure_pa": pressure,
        "sensor_type": "BME280",
        "quality": "good"
    }
    response = urequests.post(
        f"{API_BASE}/sensors/batch",
        headers=headers,
        data=ujson.dumps({"node_id": NODE_ID, "readings": [payload]})
    )
    return response.json()

def get_current_state():
    headers = {"X-API-Key": API_KEY}
    response = urequests.get(
        f"{API_BASE}/oscillator/state?node_id={NODE_ID}",
        headers=headers
    )
    state = response.json()
    # Update local PWM based on KOA
    if 'output_pwm' in state:
        pwm_pin.duty_u16(state['output_pwm'] * 257)  # Convert 0-255 to 0-65535
    return state

def register_node():
    """Register this Pico with the server on startup"""
    headers = {
        "X-API-Key": API_KEY,
        "Content-Type": "application/json"
    }
    payload = {
        "node_id": NODE_ID,
        "name": "Pico Lab Node 1",
        "hardware_type": "raspberry_pi_pico",
        "runtime": "micropython",
        "sensor_types": ["temperature", "humidity", "pressure"],
        "location": "Lab Bench 3"
    }
    try:
        response = urequests.post(
            f"{API_BASE}/sensors/nodes",
            headers=headers,
            data=ujson.dumps(payload)
        )
        return response.json()
    except Exception as e:
        print(f"Registration failed: {e}")
        return None
