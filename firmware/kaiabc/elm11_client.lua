-- ELM11 Lua Client for KaiABC
local http = require("socket.http")
local json = require("cjson")
local ltn12 = require("ltn12")

API_BASE = "http://192.168.1.100:8000/v1"
API_KEY = "kaiabc_node_elm11_001"
NODE_ID = "elm11_001"

-- PWM setup (ELM11 specific)
pwm = require("pwm")
pwm.setup(1, 1000, 0)  -- pin 1, 1kHz frequency, 0% duty
pwm.start(1)

function send_sensor_data(temp_k, humidity, pressure)
    local payload = json.encode({
        node_id = NODE_ID,
        readings = {{
            timestamp = os.date("!%Y-%m-%dT%H:%M:%SZ"),
            temperature_kelvin = temp_k,
            humidity_percent = humidity,
            pressure_pa = pressure,
            sensor_type = "BME280",
            quality = "good"
        }}
    })
    
    local response_body = {}
    local res, code, headers = http.request({
        url = API_BASE .. "/sensors/batch",
        method = "POST",
        headers = {
            ["X-API-Key"] = API_KEY,
            ["Content-Type"] = "application/json",
            ["Content-Length"] = #payload
        },
        source = ltn12.source.string(payload),
        sink = ltn12.sink.table(response_body)
    })
    
    if code == 200 then
        return json.decode(table.concat(response_body))
    else
        print("Error: HTTP " .. code)
        return nil
    end
end

function get_current_state()
    local response_body = {}
    local res, code = http.request({
        url = API_BASE .. "/oscillator/state?node_id=" .. NODE_ID,
        method = "GET",
        headers = {
            ["X-API-Key"] = API_KEY
        },
        sink = ltn12.sink.table(response_body)
    })
    
    if code == 200 then
        local state = json.decode(table.concat(response_body))
        -- Update PWM based on KOA
        if state.output_pwm then
            local duty = math.floor((state.output_pwm / 255) * 1023)
            pwm.setduty(1, duty)
        end
        return state
    else
        return nil
    end
end

function register_node()
    local payload = json.encode({
        node_id = NODE_ID,
        name = "ELM11 Field Node 1",
        hardware_type = "elm11",
        runtime = "lua",
        sensor_types = {"temperature", "humidity"},
        location = "Outdoor Station"
    })
    
    local response_body = {}
    local res, code = http.request({
        url = API_BASE .. "/sensors/nodes",
        method = "POST",
        headers = {
            ["X-API-Key"] = API_KEY,
            ["Content-Type"] = "application/json",
            ["Content-Length"] = #payload
        },
        source = ltn12.source.string(payload),
        sink = ltn12.sink.table(response_body)
    })
    
    return code == 200 or code == 201
end

-- Main loop
function main_loop()
    -- Register on startup
    register_node()
    
    while true do
        -- Read sensors (pseudo-code, adjust for ELM11 I2C)
        local temp, humidity, pressure = read_bme280()
        
        -- Send to server
        send_sensor_data(temp + 273.15, humidity, pressure)
        
        -- Get updated state and output
        get_current_state()
        
        -- Sleep for 5 seconds
        tmr.delay(5000000)  -- microseconds
    end
end
