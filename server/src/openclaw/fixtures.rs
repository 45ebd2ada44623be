//! Test fixtures shared by the openclaw.json modules.

use serde_json::{Value, json};

/// A ~3 KB config in the shape OpenClaw documents.
pub fn realistic_config() -> Value {
    json!({
        "gateway": {"mode": "local", "auth": {"mode": "token"}, "reload": {"mode": "hybrid"},
            "controlUi": {"enabled": true, "allowedOrigins": ["https://ui.example.com"]},
            "trustedProxies": ["10.0.0.0/8", "172.16.0.0/12"]},
        "agents": {"defaults": {"workspace": "~/.openclaw/workspace",
            "model": {"primary": "anthropic/claude-opus-4-6", "fallbacks": ["openai/gpt-5.2", "anthropic/claude-sonnet-4-6"]},
            "heartbeat": {"every": "2h"}, "maxConcurrent": 4, "timeoutSeconds": 600},
            "list": [{"id": "main", "default": true, "workspace": "~/.openclaw/workspace"},
                     {"id": "support", "workspace": "~/.openclaw/workspace-support", "model": "openai/gpt-5.2"}]},
        "channels": {
            "telegram": {"enabled": true, "dmPolicy": "pairing", "allowFrom": ["tg:1", "tg:2"], "groups": {"*": {"requireMention": true}}, "historyLimit": 50},
            "slack": {"enabled": true, "dmPolicy": "allowlist", "allowFrom": ["U01", "U02", "U03"], "channels": {"#support": {"allow": true}}},
            "discord": {"enabled": false, "dm": {"enabled": true}, "guilds": {"123": {"slug": "acme", "requireMention": true}}}
        },
        "models": {"mode": "merge", "providers": {"internal": {"baseUrl": "https://llm.internal.example.com/v1", "api": "openai-completions",
            "models": [{"id": "llama-70b", "name": "Llama 70B", "contextWindow": 128000, "maxTokens": 8192, "input": ["text"]}]}}},
        "tools": {"profile": "coding", "deny": ["browser", "canvas"], "exec": {"security": "allowlist", "ask": "on-miss"}, "web": {"search": {"enabled": true}}},
        "session": {"dmScope": "per-channel-peer", "reset": {"mode": "daily", "atHour": 4}},
        "messages": {"ackReaction": "eyes", "groupChat": {"mentionPatterns": ["@openclaw", "openclaw"], "historyLimit": 30}, "queue": {"mode": "collect"}},
        "logging": {"level": "info", "consoleStyle": "json", "redactSensitive": "tools", "redactPatterns": ["sk-[A-Za-z0-9]+"]},
        "cron": {"enabled": true, "maxConcurrentRuns": 2},
        "hooks": {"enabled": true, "path": "/hooks", "presets": ["gmail"]},
        "skills": {"allowBundled": ["github", "weather"], "load": {"watch": true, "watchDebounceMs": 250}},
        "plugins": {"enabled": true, "allow": ["voice-call"], "entries": {"voice-call": {"enabled": true, "config": {"provider": "twilio"}}}},
        "browser": {"enabled": false},
        "ui": {"seamColor": "#FF4500", "assistant": {"name": "Helpdesk", "avatar": "H"}},
        "update": {"channel": "stable", "checkOnStart": false},
        "discovery": {"mdns": {"mode": "off"}},
        "diagnostics": {"enabled": true, "otel": {"enabled": true, "endpoint": "http://otel:4318", "serviceName": "openclaw", "sampleRate": 0.2}},
        "web": {"enabled": true, "heartbeatSeconds": 60},
        "memory": {"backend": "builtin", "citations": "auto"},
        "env": {"shellEnv": {"enabled": false}, "vars": {"TZ": "Europe/Berlin"}},
        "auth": {"profiles": {"anthropic:default": {"provider": "anthropic", "mode": "api_key"},
                              "openai:work": {"provider": "openai", "mode": "oauth", "email": "ops@example.com"}},
                 "order": {"anthropic": ["anthropic:default"], "openai": ["openai:work"]}},
        "bindings": [{"agentId": "support", "match": {"channel": "slack", "teamId": "T0123"}},
                     {"agentId": "main", "match": {"channel": "telegram", "peer": {"kind": "group", "id": "-100123"}}}],
        "canvasHost": {"enabled": false}
    })
}
