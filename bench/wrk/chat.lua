-- wrk script: POST /v1/chat/completions, a distinct prompt per request (or 8-turn chats), greedy.
-- Settings come from the environment (bench/load_client.py sets them):
--   WRK_PATH, WRK_MODEL, WRK_TOKENS, WRK_MODE (distinct | chat), WRK_SALT (differs per measurement,
--   so no two measurements send the same prompt), WRK_TURNS (chat mode), WRK_CHATS (chats open at once).
local path = os.getenv("WRK_PATH") or "/v1/chat/completions"
local model = os.getenv("WRK_MODEL") or "deepseek"
local tokens = tonumber(os.getenv("WRK_TOKENS") or "16")
local mode = os.getenv("WRK_MODE") or "distinct"
local salt = os.getenv("WRK_SALT") or "0"
local turns = tonumber(os.getenv("WRK_TURNS") or "8")
local open_chats = tonumber(os.getenv("WRK_CHATS") or "8")
local headers = {["Content-Type"] = "application/json"}
local auth = os.getenv("WRK_TOKEN")
if auth then headers["Authorization"] = "Bearer " .. auth end
local counter = 0
local system = "You are a careful assistant for a team of engineers. Answer briefly, name the trade-offs, "
  .. "and say what you would measure before deciding. Prefer plain words to jargon, and keep every answer "
  .. "short enough to read in one breath."

local function message(role, text)
  return string.format('{"role":"%s","content":"%s"}', role, text)
end

local function chat_body(n)
  -- request n: turn t of chat c; the open chats take turns, so a chat's next turn follows its last
  local chat = (n % open_chats) + open_chats * math.floor(n / (open_chats * turns))
  local turn = math.floor(n / open_chats) % turns
  local parts = {message("system", system)}
  for k = 0, turn - 1 do
    parts[#parts + 1] = message("user", string.format("Chat %s-%d, question %d: how would you cache step %d?", salt, chat, k, k))
    parts[#parts + 1] = message("assistant", string.format("For step %d I would keep the last results in memory, "
      .. "bounded by size, and measure the hit rate first.", k))
  end
  parts[#parts + 1] = message("user", string.format("Chat %s-%d, question %d: how would you cache step %d?", salt, chat, turn, turn))
  return "[" .. table.concat(parts, ",") .. "]"
end

request = function()
  local n = counter
  counter = counter + 1
  local messages
  if mode == "chat" then
    messages = chat_body(n)
  else
    messages = "[" .. message("user", string.format("Request %s-%d: explain quantum computing in simple terms", salt, n)) .. "]"
  end
  local body = string.format('{"model":"%s","messages":%s,"max_tokens":%d,"temperature":0}', model, messages, tokens)
  return wrk.format("POST", path, headers, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,'
    .. '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
